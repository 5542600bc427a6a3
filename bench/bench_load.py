"""Load: N trainer-like clients hammer one teacher server on 127.0.0.1 while a light client probes.

Each heavy client loops like a trainer: open a session for 8 prompts, extend it 24 times, close it,
then score the 8 finished sequences in one call. The light client sends one short score request
every 50 ms. Every answer is checked afterwards against the model run in-process (top-k ids
equal, logprobs within 1e-4). Prints errors, p50/p99 latencies, and the light client's p99 under
load against its p99 alone (fairness target: <= 2x).

    python bench/bench_load.py [--clients 8] [--seconds 60] [--model DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from shared.protocol import ScoreRequest  # noqa: E402
from student_trainer.local_teacher import LocalTeacher  # noqa: E402
from student_trainer.teacher_client import TeacherClient, TeacherError  # noqa: E402
from teacher_server.backends.hf import HFBackend  # noqa: E402

K = 20


def quantile(xs: list[float], q: float) -> float:
    return float(np.quantile(np.array(xs), q)) if xs else float("nan")


class Recorder:
    def __init__(self) -> None:
        self.latency: dict[str, list[float]] = {}
        self.errors: list[str] = []
        self.answers: list[tuple[list[int], np.ndarray, np.ndarray]] = []  # (prefix, top ids, top logprobs)

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
                for _ in range(24):
                    toks = [[rng.randrange(4, vocab)] for _ in prompts]
                    t0 = time.perf_counter()
                    step = await session.extend(toks)
                    rec.time("extend", time.perf_counter() - t0)
                    if rng.random() < 0.1:  # spot-check some steps for exactness afterwards
                        rec.answers.append((list(session.prefixes[0]), step.ids[0].numpy(), step.logprobs[0].numpy()))
                await session.close()
                t0 = time.perf_counter()
                scored = await client.score(session.prefixes, start=0, top_k=K)
                rec.time("score_heavy", time.perf_counter() - t0)
                rec.answers.append((session.prefixes[1], scored[1].topk.ids[-1].numpy(),
                                    scored[1].topk.logprobs[-1].numpy()))
            except TeacherError as exc:
                rec.errors.append(repr(exc))


async def light(url: str, vocab: int, stop: float, rec: Recorder, kind: str) -> None:
    rng = random.Random(99)
    async with TeacherClient(url, client_id="light", retries=0) as client:
        while time.monotonic() < stop:
            seq = [rng.randrange(4, vocab) for _ in range(16)]
            t0 = time.perf_counter()
            try:
                (res,) = await client.score([seq], start=15, top_k=K)
                rec.time(kind, time.perf_counter() - t0)
                rec.answers.append((seq, res.topk.ids[0].numpy(), res.topk.logprobs[0].numpy()))
            except TeacherError as exc:
                rec.errors.append(repr(exc))
            await asyncio.sleep(0.05)


def check_exact(model_dir: str, answers: list[tuple[list[int], np.ndarray, np.ndarray]]) -> tuple[int, float]:
    """Recompute every recorded answer in-process; returns (mismatched top-k ids, max |Δ logprob|)."""
    backend = HFBackend(model_dir)
    bad, worst = 0, 0.0
    for i in range(0, len(answers), 64):
        chunk = answers[i : i + 64]
        req = ScoreRequest(sequences=[a[0] for a in chunk], start=[len(a[0]) - 1 for a in chunk], top_k=K)
        for (_, ids, lps), ref in zip(chunk, backend.score([req])[0], strict=True):
            bad += int(not np.array_equal(ids, ref.top_ids[0]))
            worst = max(worst, float(np.abs(lps - ref.top_logprobs[0]).max()))
    return bad, worst


async def phase(url: str, vocab: int, clients: int, seconds: float) -> Recorder:
    rec, stop = Recorder(), time.monotonic() + seconds
    kind = "light_loaded" if clients else "light_alone"
    await asyncio.gather(light(url, vocab, stop, rec, kind), *[heavy(url, i, vocab, stop, rec) for i in range(clients)])
    return rec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--model", default=None, help="Teacher dir (default: models/arith-teacher or a tiny one).")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    model = args.model or str(REPO / "models" / "arith-teacher")
    if not Path(model).exists():
        from tiny_model import make_tiny_model

        model = str(make_tiny_model(Path(tempfile.mkdtemp()) / "tiny"))
    torch.set_num_threads(args.threads)
    with LocalTeacher(model, threads=args.threads) as teacher:
        vocab = asyncio.run(_vocab(teacher.url))
        alone = asyncio.run(phase(teacher.url, vocab, 0, min(20.0, args.seconds)))
        loaded = asyncio.run(phase(teacher.url, vocab, args.clients, args.seconds))
    bad, worst = check_exact(model, alone.answers + loaded.answers)
    print(f"model {model}; {args.clients} heavy clients for {args.seconds:.0f} s; server threads {args.threads}")
    print(f"{'requests':<16}{'count':>8}{'p50 ms':>10}{'p99 ms':>10}")
    for rec in (alone, loaded):
        for kind, xs in sorted(rec.latency.items()):
            print(f"{kind:<16}{len(xs):>8}{1e3 * quantile(xs, 0.5):>10.1f}{1e3 * quantile(xs, 0.99):>10.1f}")
    ratio = quantile(loaded.latency.get("light_loaded", []), 0.99) / quantile(alone.latency["light_alone"], 0.99)
    errors = alone.errors + loaded.errors
    print(f"errors: {len(errors)} {errors[:3]}")
    print(f"exactness: {len(alone.answers) + len(loaded.answers)} answers checked, {bad} top-k mismatches, "
          f"max |Δ logprob| {worst:.2e}")
    print(f"light client p99 under load / alone: {ratio:.2f}x (target <= 2x) "
          f"{'PASS' if ratio <= 2 else 'MISS'}")
    print(f"median light latency alone {1e3 * statistics.median(alone.latency['light_alone']):.1f} ms")


async def _vocab(url: str) -> int:
    async with TeacherClient(url) as client:
        return (await client.model_info()).vocab_size


if __name__ == "__main__":
    main()
