"""Targets 1, 2 and 6: scoring over HTTP vs in process, session extend vs prefix length, server memory.

    .venv/bin/python -m bench.bench_server            # all three
    .venv/bin/python -m bench.bench_server --only score|extend|memory

1. `/v1/score` over 127.0.0.1 with msgpack must deliver >= 0.85x the tokens/s of the same model's
   in-process forward + log-softmax + top-k (16 x 256 tokens, k = 20, the larger teacher).
2. A session `extend` of one token must cost about the same at prefix 1024 as at prefix 32 (the KV
   cache is reused), and far less than re-scoring the whole prefix.
6. The server's resident memory must stay flat over 1,000 session create/extend/delete cycles.

The server subprocess and this process use the same torch thread count; they never compute at the
same time (the client waits on the server), so the comparison is one model on the same cores.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.common import (
    Section,
    base_parser,
    interleave,
    large_teacher,
    limit_threads,
    load_model,
    machine_info,
    median,
    parameters,
    report,
    rss_bytes,
    run_sync,
    spread,
    teacher_server,
    tiny_model,
)
from decoders.kv_decode import KVDecoder
from student_trainer.teacher.client import TeacherClient

BATCH, LENGTH, TOP_K = 16, 256, 20


def random_ids(rows: int, length: int, seed: int) -> torch.Tensor:
    """Token ids that avoid the special tokens (0..3) of the task tokenizer; (rows, length)."""
    return torch.randint(4, 79, (rows, length), generator=torch.Generator().manual_seed(seed))


def inprocess_score(model: torch.nn.Module, ids_B_T: torch.Tensor, k: int) -> Callable[[], object]:
    """The baseline of target 1: forward, float32 log-softmax, top-k, nothing else."""

    @torch.inference_mode()
    def run() -> object:
        logits = model(input_ids=ids_B_T, attention_mask=torch.ones_like(ids_B_T), use_cache=False).logits
        return logits.float().log_softmax(-1).topk(k, dim=-1)

    return run


# ---- 1. scoring -------------------------------------------------------------------------------
def score_rows(section: Section, label: str, path: Path, threads: int, rounds: int, json_too: bool) -> None:
    """In-process vs HTTP (binary, optionally JSON) scoring of one batch; adds rows to `section`."""
    ids = random_ids(BATCH, LENGTH, seed=0)
    seqs, tokens = ids.tolist(), ids.numel()
    base_name = "in-process forward + log-softmax + top-k"
    variants = {base_name: inprocess_score(load_model(path), ids, TOP_K)}
    with teacher_server(path, threads) as server, asyncio.Runner() as loop:
        clients = {"HTTP /v1/score, msgpack": TeacherClient(server.url)}
        if json_too:
            clients["HTTP /v1/score, JSON"] = TeacherClient(server.url, binary=False)
        for name, client in clients.items():
            variants[name] = lambda c=client: run_sync(loop, c.score(seqs, top_k=TOP_K))
        times = interleave(variants, rounds, pids=(server.proc.pid,))
        for client in clients.values():
            loop.run(client.aclose())
    base = times[base_name]
    for name, t in times.items():
        cpu = f"; {median(t.cpu) * 1e3:.0f} ms CPU (client + server)" if name != base_name else \
            f"; {median(t.cpu) * 1e3:.0f} ms CPU"
        section.add(f"{label}: {name}", f"{tokens / median(t.wall):,.0f} tok/s; {spread(t.wall)}{cpu}")
        if name == base_name:
            continue
        target = ">= 0.85" if name.endswith("msgpack") and label.startswith("larger") else ""
        section.add(f"{label}: {name} / in-process, tokens/s", "", median(base.wall) / median(t.wall), target)
        section.add(f"{label}: {name} / in-process, tokens per CPU-second", "", median(base.cpu) / median(t.cpu),
                    f"({target})" if target else "")


# ---- 2. session extend ------------------------------------------------------------------------
async def _extend_latencies(client: TeacherClient, rows: int, prefixes: tuple[int, ...],
                            steps: int) -> dict[int, list[float]]:
    """One-token extend latencies per prefix length, one session per length, extends interleaved."""
    sessions = {n: await client.open_session(random_ids(rows, n, seed=n).tolist(), top_k=TOP_K) for n in prefixes}
    lat: dict[int, list[float]] = {n: [] for n in prefixes}
    loop = asyncio.get_running_loop()
    for step in range(steps + 2):
        for n, s in sessions.items():
            started = loop.time()
            await s.extend([[5]] * rows)
            if step >= 2:  # the first extends warm up allocator and kernels
                lat[n].append(loop.time() - started)
    for s in sessions.values():
        await s.close()
    return lat


async def _rescore_latency(client: TeacherClient, rows: int, length: int, rounds: int) -> list[float]:
    """Scoring the whole prefix again (only the last position returned): what a session saves."""
    seqs = random_ids(rows, length, seed=7).tolist()
    out = []
    for _ in range(rounds):
        started = asyncio.get_running_loop().time()
        await client.score(seqs, start=length - 1, top_k=TOP_K)
        out.append(asyncio.get_running_loop().time() - started)
    return out


def extend_rows(section: Section, path: Path, threads: int, steps: int, batched_rows: int) -> None:
    """Target 2 on the larger teacher: one row (the target) and a batch (the KV-bound regime)."""
    with teacher_server(path, threads) as server, asyncio.Runner() as loop:
        client = TeacherClient(server.url)
        single = loop.run(_extend_latencies(client, 1, (32, 1024), 2 * steps))
        rescore = loop.run(_rescore_latency(client, 1, 1024, rounds=3))
        batched = loop.run(_extend_latencies(client, batched_rows, (32, 1024), steps))
        loop.run(client.aclose())
    for rows, lat in ((1, single), (batched_rows, batched)):
        section.add(f"extend 1 token x {rows} row(s), prefix 32", spread(lat[32]))
        section.add(f"extend 1 token x {rows} row(s), prefix 1024", spread(lat[1024]),
                    median(lat[1024]) / median(lat[32]), "<= 1.3")
    section.add("re-score the 1024-token prefix (1 row, /v1/score)", spread(rescore))
    section.add("extend at 1024 / re-score of 1024 (1 row)", "", median(single[1024]) / median(rescore), "<= 0.1")


def kv_growth_rows(section: Section, path: Path, rows: int, steps: int) -> None:
    """In process: the KV decoder with transformers' default cache (torch.cat per step) vs ours.

    The default `DynamicLayer.update` copies the whole cache every step, O(prefix) per token;
    `decoders.kv_decode.GrowingLayer` appends into a buffer of doubling capacity, O(1) amortised.
    What is left at prefix 1024 is attention reading the cache, which no cache layout avoids.
    """
    model = load_model(path)
    decoders = {"default cache (torch.cat per step), prefix 1024": (KVDecoder(model, grow_in_place=False), 1024),
                "shipped growing cache, prefix 1024": (KVDecoder(model), 1024),
                "shipped growing cache, prefix 32": (KVDecoder(model), 32)}
    for d, n in decoders.values():
        d.prefill(random_ids(rows, n, seed=3).tolist())
    step = {name: (lambda d=d: d.extend(list(range(rows)), [[5]] * rows)) for name, (d, _) in decoders.items()}
    times = {name: median(t.wall) for name, t in interleave(step, steps, warmup=2).items()}
    shipped, grow, grow32 = times.values()
    label = f"in process, {rows} row(s)"
    section.add(f"{label}: {list(times)[0]}", f"{shipped * 1e3:.1f} ms")
    section.add(f"{label}: {list(times)[1]}", f"{grow * 1e3:.1f} ms", grow / shipped)
    section.add(f"{label}: {list(times)[2]}", f"{grow32 * 1e3:.1f} ms")
    section.add(f"{label}: growth cache, prefix 1024 / prefix 32", "", grow / grow32, "(<= 1.3)")


# ---- 6. memory --------------------------------------------------------------------------------
async def _cycles(client: TeacherClient, pid: int, cycles: int, warmup: int, every: int) -> list[tuple[int, int]]:
    """(cycle, RSS bytes) samples over create / extend x2 / delete cycles of 4-row sessions."""
    samples = []
    for c in range(warmup + cycles + 1):
        if c >= warmup and (c - warmup) % every == 0:
            samples.append((c - warmup, rss_bytes(pid)))
        if c == warmup + cycles:
            break
        session = await client.open_session(random_ids(4, 32, seed=c).tolist(), top_k=TOP_K)
        await session.extend([[5]] * 4)
        await session.extend([[6]] * 4)
        await session.close()
    return samples


def memory_rows(section: Section, path: Path, provenance: str, threads: int, cycles: int) -> None:
    """Target 6: RSS of the server after warm-up and after `cycles` more cycles."""
    with teacher_server(path, threads) as server, asyncio.Runner() as loop:
        client = TeacherClient(server.url)
        pid = server.proc.pid
        start_rss = rss_bytes(pid)
        started = time.perf_counter()
        samples = loop.run(_cycles(client, pid, cycles, 50, max(1, cycles // 10)))
        elapsed = time.perf_counter() - started
        loop.run(client.aclose())
    first, last = samples[0][1], samples[-1][1]
    trend = ", ".join(f"{rss / 2**20:.0f}" for _, rss in samples)
    section.add(f"server RSS before any session ({provenance})", f"{start_rss / 2**20:.0f} MiB")
    section.add(f"server RSS after 50 warm-up cycles -> after {cycles} more", f"{first / 2**20:.0f} -> "
                f"{last / 2**20:.0f} MiB; every {max(1, cycles // 10)} cycles: {trend} MiB; "
                f"{elapsed / (cycles + 50) * 1e3:.1f} ms per cycle", last / first, "<= 1.1")


def run(threads: int = 1, quick: bool = False, only: str | None = None) -> list[Section]:
    limit_threads(threads)
    big = large_teacher()
    tiny, provenance = tiny_model("teacher")
    n_big = parameters(big)
    sections = []
    if only in (None, "score"):
        s = Section("1. /v1/score over HTTP vs in-process (16 x 256 tokens, top-20)",
                    f"Larger teacher: random Qwen3, hidden 512, 8 layers, {n_big / 1e6:.1f}M parameters, task "
                    f"vocabulary (79); tiny teacher: {provenance}. Ratio = HTTP tokens/s / in-process tokens/s; "
                    f"medians of {2 if quick else 5} interleaved rounds.")
        score_rows(s, "larger teacher", big, threads, 2 if quick else 5, json_too=False)
        score_rows(s, "tiny teacher (overhead-bound, context)", tiny, threads, 3 if quick else 9, json_too=True)
        sections.append(s)
    if only in (None, "extend"):
        steps = 4 if quick else 15
        s = Section("2. Session extend latency vs prefix length (larger teacher, HTTP, msgpack)",
                    f"One new token per row per extend; medians over {2 * steps} (1 row) or {steps} (8 rows) "
                    "extends per prefix, the two sessions interleaved. Ratio = latency at prefix 1024 / latency "
                    "at prefix 32.")
        extend_rows(s, big, threads, steps, batched_rows=8)
        for rows in (1, 8):
            kv_growth_rows(s, big, rows=rows, steps=4 if quick else 10)
        sections.append(s)
    if only in (None, "memory"):
        cycles = 200 if quick else 1000
        s = Section("6. Teacher server memory over session cycles",
                    f"Tiny teacher ({provenance}); each cycle opens a 4-row session of 32-token prompts, extends "
                    "it twice by one token and deletes it. Ratio = RSS after / RSS after warm-up.")
        memory_rows(s, tiny, provenance, threads, cycles)
        sections.append(s)
    return sections


def main() -> None:
    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["score", "extend", "memory"], default=None)
    args = ap.parse_args()
    info = machine_info(args.threads)
    print(report(run(args.threads, args.quick, args.only), info))


if __name__ == "__main__":
    main()
