"""GPU check, one script for a short lease: the transformers backend on CUDA against the CPU
(exactness), its tokens/s in process and over HTTP, session extend latency, and a short TRB run
with the student and the teacher on the GPU. Prints a markdown report (also written to --out).

    python -m bench.gpu_check --out DIR [--steps 40]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from shared.protocol import ScoreRequest
from student_trainer.config import load_config
from student_trainer.tasks import arithmetic
from student_trainer.teacher.client import TeacherClient
from student_trainer.teacher.local import LocalTeacher
from student_trainer.training.loop import train_sync
from teacher_server.backends.hf import HFBackend

REPO = Path(__file__).resolve().parents[1]
TEACHER = str(REPO / "models" / "arith-teacher")
TOP_K = 20


def task_sequences(n: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TEACHER)
    return [tok(p.prompt + p.solution)["input_ids"] for p in arithmetic.generate(n, seed=0, split="test")]


def compare(a: HFBackend, b: HFBackend, seqs: list[list[int]]) -> tuple[float, float, float]:
    """(fraction of positions with identical top-k ids, same for the top-1 id, max |Δ logprob| of the
    ids both top-k lists hold)."""
    req = ScoreRequest(sequences=seqs, top_k=TOP_K)
    same, same1, total, worst = 0, 0, 0, 0.0
    for ra, rb in zip(a.score([req])[0], b.score([req])[0], strict=True):
        same += int((ra.top_ids == rb.top_ids).all(axis=-1).sum())
        same1 += int((ra.top_ids[:, 0] == rb.top_ids[:, 0]).sum())
        total += ra.top_ids.shape[0]
        # logprobs of a's top-k ids under b: match by id where both lists hold it
        for pa_ids, pa_lp, pb_ids, pb_lp in zip(ra.top_ids, ra.top_logprobs, rb.top_ids, rb.top_logprobs,
                                                strict=True):
            lookup = dict(zip(pb_ids.tolist(), pb_lp.tolist(), strict=True))
            diffs = [abs(lp - lookup[i]) for i, lp in zip(pa_ids.tolist(), pa_lp.tolist(), strict=True) if i in lookup]
            worst = max([worst, *diffs])
    return same / total, same1 / total, worst


def big_model(path: Path, small: bool = False) -> Path:
    """A random Qwen3 of ~0.2B parameters with a 32k vocabulary: the compute-bound regime."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=32000, hidden_size=128 if small else 1024, intermediate_size=3072,
                      num_hidden_layers=2 if small else 16,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=64, max_position_embeddings=4096,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    Qwen3ForCausalLM(cfg).save_pretrained(path)
    return path


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, rounds: int = 5) -> float:  # noqa: ANN001
    fn()
    sync()
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


async def http_rates(url: str, seqs: list[list[int]], rows: int) -> tuple[float, float, float]:
    """(HTTP score seconds for `seqs`, extend ms at prefix 32, extend ms at prefix 1024)."""
    async with TeacherClient(url) as client:
        await client.score(seqs, top_k=TOP_K)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            await client.score(seqs, top_k=TOP_K)
            times.append(time.perf_counter() - t0)
        lat = {}
        for n in (32, 1024):
            session = await client.open_session([[7] * n] * rows, top_k=TOP_K)
            steps = []
            for i in range(22):
                t0 = time.perf_counter()
                await session.extend([[5]] * rows)
                if i >= 2:
                    steps.append(time.perf_counter() - t0)
            await session.close()
            lat[n] = statistics.median(steps) * 1e3
    return statistics.median(times), lat[32], lat[1024]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_check_out")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of this script on a machine without one")
    parser.add_argument("--small", action="store_true", help="a much smaller 'larger' model (dry runs)")
    args = parser.parse_args()
    dev = args.device
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(0) if dev == "cuda" else "none (CPU dry run)"
    lines = [f"GPU: {name}; torch {torch.__version__}; "
             f"transformers {__import__('transformers').__version__}", "", "| check | result |", "| --- | --- |"]

    def row(name: str, value: str) -> None:
        lines.append(f"| {name} | {value} |")
        print(f"{name}: {value}", flush=True)

    # 1. exactness: the shipped teacher, every position of 64 task sequences, CUDA vs CPU
    seqs = task_sequences(64)
    cpu = HFBackend(TEACHER)
    for dtype in ("float32", "bfloat16"):
        frac, frac1, worst = compare(cpu, HFBackend(TEACHER, device=dev, dtype=dtype), seqs)
        row(f"arith-teacher, {dev} {dtype} vs CPU float32, {sum(map(len, seqs))} positions",
            f"top-{TOP_K} ids identical (same order) at {frac:.2%} of positions, top-1 at {frac1:.2%}; "
            f"max abs Δ logprob {worst:.2e}")

    # 2. a larger random teacher: exactness on a few rows, tokens/s in process and over HTTP
    tmp = Path(tempfile.mkdtemp())
    big = big_model(tmp / "big", small=args.small)
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(10, 32000, (16, 256), generator=gen).tolist()
    frac, frac1, worst = compare(HFBackend(str(big)), HFBackend(str(big), device=dev), batch[:4])
    row(f"random Qwen3 0.2B, {dev} float32 vs CPU float32, 4 x 256",
        f"top-20 ids identical {frac:.2%}, top-1 {frac1:.2%}; max abs Δ {worst:.2e}")
    for dtype in ("float32", "bfloat16"):
        backend = HFBackend(str(big), device=dev, dtype=dtype)
        req = ScoreRequest(sequences=batch, top_k=TOP_K)
        secs = timed(lambda b=backend, r=req: b.score([r]))
        row(f"random Qwen3 0.2B {dtype}, in-process score 16 x 256, top-20", f"{16 * 256 / secs:,.0f} tok/s")
        del backend
        if dev == "cuda":
            torch.cuda.empty_cache()
        with LocalTeacher(str(big), "--device", dev, "--dtype", dtype, "--max-batch-tokens", "4096") as server:
            http_s, ext32, ext1024 = asyncio.run(http_rates(server.url, batch, rows=8))
        row(f"random Qwen3 0.2B {dtype}, HTTP /v1/score (msgpack) 16 x 256",
            f"{16 * 256 / http_s:,.0f} tok/s ({secs / http_s:.2f}x in-process)")
        row(f"random Qwen3 0.2B {dtype}, session extend 8 rows, prefix 32 / 1024",
            f"{ext32:.1f} ms / {ext1024:.1f} ms ({ext1024 / ext32:.2f}x)")

    # 3. a short TRB run: student and teacher on the GPU
    with LocalTeacher(TEACHER, "--device", dev) as server:
        cfg = load_config(REPO / "recipes" / "arithmetic" / "trb.yaml", [
            f"teacher.url={server.url}", f"student.device={dev}", f"train.steps={args.steps}",
            f"train.eval_every={args.steps // 2}", f"train.out_dir={out / 'trb_gpu'}", "train.progress=false",
            "train.save_every=0"])
        t0 = time.perf_counter()
        summary = train_sync(cfg)
        wall = time.perf_counter() - t0
    records = [json.loads(x) for x in (out / "trb_gpu" / "metrics.jsonl").read_text().splitlines()]
    tps = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    row(f"TRB run on {dev}, arith student/teacher, {args.steps} steps x batch {cfg.train.batch_size}",
        f"{wall:.0f} s wall incl. evals; {statistics.median(tps):,.0f} generated tok/s (median step); accuracy "
        f"{summary.get('initial_accuracy', float('nan')):.3f} -> {summary['final_accuracy']:.3f}; probe KL "
        f"{summary.get('initial_probe_kl', float('nan')):.3f} -> {summary['final_probe_kl']:.3f}")
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
