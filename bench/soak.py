"""Soak: trainer-like and light clients share one teacher server while faults arrive at random.

Faults, one at a random moment every `--fault-every` seconds on average: kill -9 of the model
worker, a client that hangs up mid-request (mid-body, or while its request is queued or running),
malformed and oversized requests, a poison request (crashes the worker; must end quarantined, 422)
and a forward made to hang (the watchdog must kill it; retried, it ends quarantined too). The
poison and hang faults use the test-only hooks of `tests/fault_hooks/`, which this script
turns on for its own server only. Every successful answer is checked afterwards against the model
run in this process (`bench_load.check_exact`). Reports answers checked, mismatches (must be 0),
client errors by kind, fault outcomes, worker restarts, quarantined requests, p50/p99 per client,
and the RSS of the server and its worker over time. Exits 1 on a mismatch, an unexpected fault
outcome, or a server that died.

    python bench/soak.py --minutes 10 [--trainers 2] [--lights 2] [--fault-every 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import socket
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from bench.bench_load import K, Recorder, check_exact, quantile  # noqa: E402
from student_trainer.teacher.client import TeacherClient, TeacherError  # noqa: E402
from student_trainer.teacher.local import LocalTeacher  # noqa: E402

sys.path.insert(0, str(REPO / "tests" / "fault_hooks"))
import fault_markers as faults  # noqa: E402

MAX_BODY = 256 << 10  # the soak server's body limit, so that an oversized body is cheap to send
FAULTS = ("kill9", "disconnect_body", "disconnect_queued", "malformed", "oversized", "poison", "hang")


def _kind(exc: Exception) -> str:
    if isinstance(exc, TeacherError):
        return f"{exc.status or 'transport'} {exc.code or ''}".strip()
    return type(exc).__name__


class Soak:
    def __init__(self, url: str, vocab: int, max_context: int, stop: float, seed: int) -> None:
        self.url, self.vocab, self.max_context, self.stop = url, vocab, max_context, stop
        self.rng = random.Random(seed)
        self.rec = Recorder()
        self.errors: Counter[str] = Counter()  # errors the clients saw after their retries
        self.outcomes: Counter[str] = Counter()  # "fault: outcome"
        self.unexpected: list[str] = []
        self.responses = 0  # successful answers received (each session step, each score call)

    def tokens(self, rng: random.Random, n: int) -> list[int]:
        return [rng.randrange(4, self.vocab) for _ in range(n)]

    async def trainer(self, idx: int) -> None:
        """Like a trainer's rollout: a session over a batch of prompts, extended step by step, then scored."""
        rng, name = random.Random(1000 + idx), f"trainer-{idx}"
        async with TeacherClient(self.url, client_id=name, retries=8, backoff_s=0.2) as client:
            while time.monotonic() < self.stop:
                prompts = [self.tokens(rng, rng.randint(8, 24)) for _ in range(4)]
                steps: list[Any] = []
                session = None
                try:
                    t0 = time.perf_counter()
                    session = await client.open_session(prompts, top_k=K)
                    self.rec.time(name, time.perf_counter() - t0)
                    self.responses += 1
                    steps.append(session.first)
                    for _ in range(16):
                        t0 = time.perf_counter()
                        steps.append(await session.extend([self.tokens(rng, 1) for _ in prompts]))
                        self.rec.time(name, time.perf_counter() - t0)
                        self.responses += 1
                    await session.close()
                    t0 = time.perf_counter()
                    scored = await client.score(session.prefixes, top_k=K)
                    self.rec.time(name, time.perf_counter() - t0)
                    self.responses += 1
                    self.rec.answers += [(list(seq), 0, s.topk.ids.numpy(), s.topk.logprobs.numpy())
                                         for seq, s in zip(session.prefixes, scored, strict=True)]
                except (TeacherError, httpx.HTTPError) as exc:
                    self.errors[f"{name}: {_kind(exc)}"] += 1
                if session is not None:
                    self.session_rows(prompts, session.prefixes, steps)

    def session_rows(self, prompts: list[list[int]], prefixes: list[list[int]], steps: list[Any]) -> None:
        """Each row's session answers as one answer over the positions they cover (one forward checks
        them all): step i answered the next token after len(prompt) + i tokens."""
        for row, prompt in enumerate(prompts):
            if steps:
                ids = np.concatenate([s.ids[row : row + 1].numpy() for s in steps])
                lps = np.concatenate([s.logprobs[row : row + 1].numpy() for s in steps])
                self.rec.answers.append((prefixes[row][: len(prompt) + len(steps) - 1], len(prompt) - 1, ids, lps))

    async def light(self, idx: int) -> None:
        """A small experiment: one short score request, then a pause."""
        rng, name = random.Random(2000 + idx), f"light-{idx}"
        async with TeacherClient(self.url, client_id=name, retries=8, backoff_s=0.2) as client:
            while time.monotonic() < self.stop:
                seq = self.tokens(rng, 16)
                try:
                    t0 = time.perf_counter()
                    (res,) = await client.score([seq], start=15, top_k=K)
                    self.rec.time(name, time.perf_counter() - t0)
                    self.responses += 1
                    self.rec.answers.append((seq, 15, res.topk.ids.numpy(), res.topk.logprobs.numpy()))
                except (TeacherError, httpx.HTTPError) as exc:
                    self.errors[f"{name}: {_kind(exc)}"] += 1
                await asyncio.sleep(0.1)

    async def injector(self, server_pid: int, every: float) -> None:
        while True:
            await asyncio.sleep(self.rng.expovariate(1 / every))
            if time.monotonic() >= self.stop - 2:
                return
            fault = self.rng.choice(FAULTS)
            outcome, expected = await getattr(self, fault)(server_pid)
            self.outcomes[f"{fault}: {outcome}"] += 1
            if outcome not in expected:
                self.unexpected.append(f"{fault}: {outcome}")

    async def kill9(self, server_pid: int) -> tuple[str, set[str]]:
        pid = worker_pid(server_pid)
        if pid is None:
            return "no worker (restarting)", {"no worker (restarting)"}
        os.kill(pid, signal.SIGKILL)
        return "killed", {"killed"}

    async def disconnect_body(self, _: int) -> tuple[str, set[str]]:
        """Headers announce a body, half of it comes, the connection closes."""
        host, port = self.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 4000\r\n\r\n{\"sequences\": [[1, 2, 3")
        return "hung up", {"hung up"}

    async def disconnect_queued(self, _: int) -> tuple[str, set[str]]:
        """A large request whose client gives up while it is queued or running."""
        body = {"sequences": [self.tokens(self.rng, 60) for _ in range(16)], "top_k": K}
        async with httpx.AsyncClient(base_url=self.url, headers={"x-client-id": "quitter"}) as http:
            try:
                resp = await http.post("/v1/score", json=body, timeout=0.05)
                return f"answered {resp.status_code}", {"answered 200", "answered 503", "hung up"}
            except httpx.TimeoutException:
                return "hung up", {"hung up"}

    async def malformed(self, _: int) -> tuple[str, set[str]]:
        bodies = [(b"{not json", "application/json"), (b"\xc1\xc1", "application/x-msgpack"),
                  (json.dumps({"sequences": [[1, -5]]}).encode(), "application/json"),
                  (json.dumps({"sequences": "abc"}).encode(), "application/json"), (b"{}", "text/plain")]
        content, media = self.rng.choice(bodies)
        return await self._post(content, media), {"400", "415", "422"}

    async def oversized(self, _: int) -> tuple[str, set[str]]:
        if self.rng.random() < 0.5:
            return await self._post(b"[" + b"1," * MAX_BODY + b"1]", "application/json"), {"413"}
        body = json.dumps({"sequences": [self.tokens(self.rng, self.max_context + 5)]}).encode()
        return await self._post(body, "application/json"), {"422"}

    async def _post(self, content: bytes, media: str) -> str:
        async with httpx.AsyncClient(base_url=self.url, headers={"x-client-id": "vandal"}) as http:
            try:
                return str((await http.post("/v1/score", content=content, headers={"content-type": media},
                                            timeout=60)).status_code)
            except httpx.HTTPError as exc:
                return type(exc).__name__

    async def poison(self, _: int) -> tuple[str, set[str]]:
        return await self._marked(list(faults.CRASH)), {"422 quarantined"}

    async def hang(self, _: int) -> tuple[str, set[str]]:
        return await self._marked(list(faults.HANG)), {"422 quarantined"}

    async def _marked(self, marker: list[int]) -> str:
        """A fresh marked request, sent by a client that retries 503s as trainers do."""
        async with TeacherClient(self.url, client_id="poisoner", retries=4, backoff_s=0.2, timeout=120) as client:
            try:
                await client.score([marker + self.tokens(self.rng, 8)], top_k=K)
                return "answered"
            except (TeacherError, httpx.HTTPError) as exc:
                return _kind(exc)


def worker_pid(server_pid: int) -> int | None:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != server_pid:
                continue
            if "spawn_main" in (stat.parent / "cmdline").read_text():
                return int(stat.parent.name)
        except (OSError, ValueError):
            continue
    return None


def rss_mb(pid: int | None) -> float | None:
    """The process's RSS, or None when there is none to read (e.g. the worker is being restarted)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, TypeError, ValueError):
        pass
    return None


def figure(x: float | None, digits: int | None = None) -> float | int | None:
    """A figure for the summary: rounded, or None (JSON null) for a sample that is missing or NaN, so
    that a gap in a series (a worker between restarts, a client that never got an answer) cannot
    cost the summary of a run that is otherwise over."""
    if x is None or not math.isfinite(x):
        return None
    return round(x, digits) if digits is not None else round(x)


def latency_ms(xs: list[float]) -> list[float | int | None]:
    """[p50 ms, p99 ms, count] of a client's latencies; the quantiles are None when it has none."""
    if not xs:
        return [None, None, 0]
    return [figure(1e3 * quantile(xs, 0.5), 1), figure(1e3 * quantile(xs, 0.99), 1), len(xs)]


def show(x: float | int | None, spec: str = "") -> str:
    return "-" if x is None else format(x, spec)


async def sample_rss(server_pid: int, every: float, stop: float,
                     out: list[tuple[float, float | None, float | None]]) -> None:
    started = time.monotonic()
    while True:
        out.append((time.monotonic() - started, rss_mb(server_pid), rss_mb(worker_pid(server_pid))))
        if time.monotonic() >= stop:
            return
        await asyncio.sleep(min(every, max(0.0, stop - time.monotonic())))


def metrics(url: str) -> dict[str, float]:
    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("trb_teacher_worker_restarts", "trb_teacher_worker_hung", "trb_teacher_quarantined_requests"):
            values[name.removeprefix("trb_teacher_")] = float(value)
    return values


async def soak(url: str, server_pid: int, seconds: float, args: argparse.Namespace) -> tuple[Soak, list]:
    async with TeacherClient(url) as client:
        info = await client.model_info()
    stop = time.monotonic() + seconds
    run, rss = Soak(url, info.vocab_size, info.max_context, stop, args.seed), []
    await asyncio.gather(*[run.trainer(i) for i in range(args.trainers)], *[run.light(i) for i in range(args.lights)],
                         run.injector(server_pid, args.fault_every),
                         sample_rss(server_pid, max(1.0, seconds / 20), stop, rss))
    return run, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--trainers", type=int, default=2)
    parser.add_argument("--lights", type=int, default=2)
    parser.add_argument("--fault-every", type=float, default=8.0, help="Mean seconds between faults.")
    parser.add_argument("--deadline", type=float, default=5.0, help="The server's --forward-deadline (s).")
    parser.add_argument("--model", default=str(REPO / "models" / "arith-teacher"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="Also write the figures to this file.")
    args = parser.parse_args()
    faults.enable(os.environ)  # for the server started below, and its workers
    os.environ["TRB_TEACHER_MAX_BODY_BYTES"] = str(MAX_BODY)
    flags = ["--forward-deadline", str(args.deadline), "--forward-deadline-per-token", "0.01", "--shutdown-grace", "5"]
    with LocalTeacher(args.model, *flags, threads=1) as teacher:
        run, rss = asyncio.run(soak(teacher.url, teacher.proc.pid, args.minutes * 60, args))
        server_alive = teacher.proc.poll() is None
        counts = metrics(teacher.url) if server_alive else {}
    positions, bad, ties, worst = check_exact(args.model, run.rec.answers) if run.rec.answers else (0, 0, 0, 0.0)
    report = {"minutes": args.minutes, "answers": run.responses, "positions": positions, "mismatches": bad,
              "tie_swaps": ties, "max_abs_logprob_diff": worst, "errors": dict(run.errors),
              "faults": dict(sorted(run.outcomes.items())), "unexpected": run.unexpected, **counts,
              "server_alive": server_alive,
              "latency_ms": {c: latency_ms(xs) for c, xs in sorted(run.rec.latency.items())},
              "rss_mb": [(figure(t), figure(s), figure(w)) for t, s, w in rss]}
    if args.json:  # first: the figures are kept even if printing them failed
        Path(args.json).write_text(json.dumps(report, indent=1))
    print_report(report)
    sys.exit(0 if server_alive and bad == 0 and positions and not run.unexpected else 1)


def print_report(r: dict[str, Any]) -> None:
    print(f"soak of {r['minutes']:g} min: server alive {r['server_alive']}; answers checked {r['answers']} "
          f"({r['positions']} positions), mismatches {r['mismatches']} (tie swaps {r['tie_swaps']}, "
          f"max |Δ logprob| {r['max_abs_logprob_diff']:.1e})")
    print(f"worker restarts {r.get('worker_restarts')}, killed by the watchdog {r.get('worker_hung')}, "
          f"requests quarantined {r.get('quarantined_requests')}")
    print("faults:", ", ".join(f"{k} x{v}" for k, v in r["faults"].items()) or "none")
    print("unexpected fault outcomes:", r["unexpected"] or "none")
    print("client errors after retries:", r["errors"] or "none")
    print(f"{'client':<12}{'requests':>10}{'p50 ms':>10}{'p99 ms':>10}")
    for client, (p50, p99, n) in r["latency_ms"].items():
        print(f"{client:<12}{n:>10}{show(p50, '.1f'):>10}{show(p99, '.1f'):>10}")
    print("RSS MB (s: server, worker; - where no process was there to read):",
          "  ".join(f"{t}: {show(s)}, {show(w)}" for t, s, w in r["rss_mb"]))


if __name__ == "__main__":
    main()
