"""Load: N trainer-like clients hammer one teacher server on 127.0.0.1 while a light client probes.

Each heavy client loops like a trainer: open a session for 8 prompts, extend it 24 times, close it,
then score the 8 finished sequences in one call. The heavy clients run in their own process (as
other experiments would); the light client, in this one, sends one short score request, then
pauses (200 ms: it then uses a few percent of the model against ~11% for each heavy client). Every
answer (every row of every session step, every position of every score) is checked afterwards
against the model run in process: same top-k ids, and the largest logprob difference. Prints
errors, p50/p99 latencies, and the light client's p99 under load against its p99 alone (fairness
target: <= 2x), both as the client sees it and as the server reports it in `Server-Timing` (queue
wait + model time: the part the scheduler controls; the rest is HTTP, encoding and, on a small
machine, waiting for a core).

    python bench/bench_load.py [--clients 8] [--seconds 60] [--model DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import httpx  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from shared import codec  # noqa: E402
from shared.protocol import ScoreRequest, ScoreResponse  # noqa: E402
from student_trainer.teacher.client import TeacherClient, TeacherError  # noqa: E402
from student_trainer.teacher.local import LocalTeacher  # noqa: E402
from teacher_server.backends.hf import HFBackend  # noqa: E402

K = 20


def quantile(xs: list[float], q: float) -> float:
    return float(np.quantile(np.array(xs), q)) if xs else float("nan")


Answer = tuple[list[int], int, np.ndarray, np.ndarray]  # (sequence, first position, top ids, top logprobs)


class Recorder:
    def __init__(self) -> None:
        self.latency: dict[str, list[float]] = {}
        self.errors: list[str] = []
        self.answers: list[Answer] = []

    def rows(self, prefixes: list[list[int]], step: Any) -> None:
        """Keep every row of a session answer: the next-token top-k after each row's prefix."""
        for row, prefix in enumerate(prefixes):
            self.answers.append((list(prefix), len(prefix) - 1, step.ids[row : row + 1].numpy(),
                                 step.logprobs[row : row + 1].numpy()))

    def time(self, kind: str, seconds: float) -> None:
        self.latency.setdefault(kind, []).append(seconds)


async def heavy(url: str, idx: int, vocab: int, stop: float, rec: Recorder) -> None:
    rng = random.Random(idx)
    async with TeacherClient(url, client_id=f"heavy-{idx}", retries=0) as client:
        while time.monotonic() < stop:
            prompts = [[rng.randrange(4, vocab) for _ in range(rng.randint(8, 32))] for _ in range(8)]
            try:
                t0 = time.perf_counter()
                session = await client.open_session(prompts, top_k=K)
                rec.time("session_open", time.perf_counter() - t0)
                rec.rows(session.prefixes, session.first)
                for _ in range(24):
                    toks = [[rng.randrange(4, vocab)] for _ in prompts]
                    t0 = time.perf_counter()
                    step = await session.extend(toks)
                    rec.time("extend", time.perf_counter() - t0)
                    rec.rows(session.prefixes, step)
                await session.close()
                t0 = time.perf_counter()
                scored = await client.score(session.prefixes, start=0, top_k=K)
                rec.time("score_heavy", time.perf_counter() - t0)
                rec.answers += [(seq, 0, s.topk.ids.numpy(), s.topk.logprobs.numpy())
                                for seq, s in zip(session.prefixes, scored, strict=True)]
            except TeacherError as exc:
                rec.errors.append(repr(exc))


async def light(url: str, vocab: int, stop: float, rec: Recorder, kind: str, period: float) -> None:
    """Raw httpx (msgpack both ways), so the `Server-Timing` header of each answer can be read."""
    rng = random.Random(99)
    headers = {"content-type": codec.MSGPACK, "accept": codec.MSGPACK, "x-client-id": "light"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:
        while time.monotonic() < stop:
            seq = [rng.randrange(4, vocab) for _ in range(16)]
            body = codec.encode(ScoreRequest(sequences=[seq], start=15, top_k=K), codec.MSGPACK)
            t0 = time.perf_counter()
            try:
                resp = await client.post("/v1/score", content=body)
                resp.raise_for_status()
                rec.time(kind, time.perf_counter() - t0)
                timing = dict(p.strip().split(";dur=") for p in resp.headers["server-timing"].split(","))
                rec.time(kind + "_server", (float(timing["queue"]) + float(timing["model"])) / 1e3)
                rec.time(kind + "_queue", float(timing["queue"]) / 1e3)
                (res,) = codec.decode(resp.content, ScoreResponse, codec.MSGPACK).results
                rec.answers.append((seq, 15, res.top_ids, res.top_logprobs))
            except httpx.HTTPError as exc:
                rec.errors.append(repr(exc))
            await asyncio.sleep(period)


def check_exact(model_dir: str, answers: list[Answer]) -> tuple[int, int, int, float]:
    """Recompute every recorded answer in process. Returns (positions checked, positions whose top-k
    ids differ beyond ties, positions that differ only by a tie, max |Δ logprob|)."""
    backend = HFBackend(model_dir)
    positions, bad, ties, worst = 0, 0, 0, 0.0
    for i in range(0, len(answers), 64):
        chunk = answers[i : i + 64]
        req = ScoreRequest(sequences=[a[0] for a in chunk], start=[a[1] for a in chunk], top_k=K)
        for (_, _, ids, lps), ref in zip(chunk, backend.score([req])[0], strict=True):
            positions += len(ids)
            worst = max(worst, float(np.abs(lps - ref.top_logprobs).max()))
            for n in np.flatnonzero((ids != ref.top_ids).any(axis=-1)):
                ties += 1
                bad += int(not _tie_swap(ids[n], lps[n], ref.top_ids[n], ref.top_logprobs[n]))
    return positions, bad, ties - bad, worst


def _tie_swap(ids: np.ndarray, lps: np.ndarray, ref_ids: np.ndarray, ref_lps: np.ndarray, tol: float = 1e-3) -> bool:
    """Whether two top-k lists differ only in the order of (near-)equal logprobs, where a float32
    rounding difference between two batch layouts may put either token first or k-th."""
    ref = dict(zip(ref_ids.tolist(), ref_lps.tolist(), strict=True))
    boundary = float(ref_lps[-1])  # a token missing from the reference list must tie with its last entry
    return all(abs(ref.get(i, boundary) - lp) <= tol for i, lp in zip(ids.tolist(), lps.tolist(), strict=True))


def heavy_process(url: str, vocab: int, clients: int, seconds: float) -> Recorder:
    """The heavy clients, all in one process of their own."""
    async def run() -> Recorder:
        rec, stop = Recorder(), time.monotonic() + seconds
        await asyncio.gather(*[heavy(url, i, vocab, stop, rec) for i in range(clients)])
        return rec
    return asyncio.run(run())


def phase(url: str, vocab: int, clients: int, seconds: float, period: float) -> Recorder:
    rec = Recorder()
    kind = "light_loaded" if clients else "light_alone"
    if not clients:
        asyncio.run(light(url, vocab, time.monotonic() + seconds, rec, kind, period))
        return rec
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        pending = pool.apply_async(heavy_process, (url, vocab, clients, seconds))
        time.sleep(2.0)  # let the heavy clients get going before probing
        asyncio.run(light(url, vocab, time.monotonic() + seconds - 4.0, rec, kind, period))
        heavy_rec = pending.get()
    rec.errors += heavy_rec.errors
    rec.answers += heavy_rec.answers
    for k, xs in heavy_rec.latency.items():
        rec.latency.setdefault(k, []).extend(xs)
    return rec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--model", default=None, help="Teacher dir (default: models/arith-teacher or a tiny one).")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model-thread", action="store_true", help="Serve the model from a thread of the "
                        "server process instead of a worker process (for comparison).")
    parser.add_argument("--light-period", type=float, default=0.2, help="Seconds the light client waits between "
                        "requests (0.05 makes it use about as much model time as each heavy client here).")
    parser.add_argument("--max-batch-tokens", type=int, default=None, help="The server's token budget per forward.")
    args = parser.parse_args()
    model = args.model or str(REPO / "models" / "arith-teacher")
    if not Path(model).exists():
        from tiny_model import make_tiny_model

        model = str(make_tiny_model(Path(tempfile.mkdtemp()) / "tiny"))
    torch.set_num_threads(args.threads)
    extra = ["--max-batch-tokens", str(args.max_batch_tokens)] if args.max_batch_tokens else []
    extra += ["--model-thread"] if args.model_thread else []
    with LocalTeacher(model, *extra, threads=args.threads) as teacher:
        vocab = asyncio.run(_vocab(teacher.url))
        alone = phase(teacher.url, vocab, 0, args.seconds, args.light_period)
        before, t0 = model_seconds(teacher.url), time.monotonic()
        loaded = phase(teacher.url, vocab, args.clients, args.seconds, args.light_period)
        used, elapsed = model_seconds(teacher.url), time.monotonic() - t0
    share = {c: (used[c] - before.get(c, 0.0)) / elapsed for c in used}
    heavy_share = [v for c, v in share.items() if c.startswith("heavy")]
    positions, bad, ties, worst = check_exact(model, alone.answers + loaded.answers)
    print(f"model {model}; {args.clients} heavy clients for {args.seconds:.0f} s; server threads {args.threads}; "
          f"max batch tokens {args.max_batch_tokens or 'default'}")
    print(f"{'requests':<16}{'count':>8}{'p50 ms':>10}{'p99 ms':>10}")
    for rec in (alone, loaded):
        for kind, xs in sorted(rec.latency.items()):
            print(f"{kind:<16}{len(xs):>8}{1e3 * quantile(xs, 0.5):>10.1f}{1e3 * quantile(xs, 0.99):>10.1f}")
    def p99_ratio(suffix: str) -> float:
        return (quantile(loaded.latency.get("light_loaded" + suffix, []), 0.99)
                / quantile(alone.latency["light_alone" + suffix], 0.99))

    ratio, server_ratio = p99_ratio(""), p99_ratio("_server")
    errors = alone.errors + loaded.errors
    if heavy_share:  # (servers before the per-client metric lack it)
        print(f"model time used under load: light client {share.get('light', 0):.1%}, each heavy client "
              f"{min(heavy_share):.1%}-{max(heavy_share):.1%}, in all {sum(share.values()):.0%}")
    print(f"errors: {len(errors)} {errors[:3]}")
    print(f"exactness: {len(alone.answers) + len(loaded.answers)} answers ({positions} positions) checked, "
          f"{bad} with other top-k ids ({ties} more differ only in the order of tied logprobs), "
          f"max |Δ logprob| {worst:.2e}")
    print(f"light client p99 under load / alone: {ratio:.2f}x (target <= 2x) "
          f"{'PASS' if ratio <= 2 else 'MISS'}")
    print(f"same, server side (queue + model, Server-Timing): {server_ratio:.2f}x "
          f"{'PASS' if server_ratio <= 2 else 'MISS'}")
    print(f"median light latency alone {1e3 * statistics.median(alone.latency['light_alone']):.1f} ms")


def model_seconds(url: str) -> dict[str, float]:
    """Model seconds used so far by each client, from the server's metrics."""
    text = httpx.get(f"{url}/metrics").text
    return {sample.labels["client"]: sample.value for family in text_string_to_metric_families(text)
            if family.name == "trb_teacher_model_seconds" for sample in family.samples
            if sample.name.endswith("_total")}


async def _vocab(url: str) -> int:
    async with TeacherClient(url) as client:
        return (await client.model_info()).vocab_size


if __name__ == "__main__":
    main()
