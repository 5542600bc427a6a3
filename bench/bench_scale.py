"""The trainer at the paper's scale: Qwen3-shaped random-weight models, one script, ratios in one run.

    .venv/bin/python -m bench.bench_scale --quick        # CPU: narrow shapes, every code path (~3 min)
    python -m bench.bench_scale --out DIR                # CUDA: the real shapes (one H200: ~6-7 min)

Sections (each variant against today's path, interleaved in the same process):
  1. loss memory: forward + loss + backward of 4 rows x 1,200 tokens at vocabulary 151,936 with a
     1-layer, 64-wide Qwen3 body, full logits vs the chunked loss; peak above the model, in float32
     copies of the [tokens x vocab] logits (CPU: peak RSS of a fresh child process per variant).
  2. micro-step of the students (0.6B, 1.7B; 8 rows x 1,200 tokens): fp32 + full logits (before) vs
     fp32 + chunked vs bf16-mixed + chunked: seconds and peak memory (CUDA; the CPU runs narrow bodies).
  3. decode ms per step of the 1.7B student at 8/32/64 rows and of an 8B teacher session extend (8 rows):
     the eager decoder vs the static-cache decoder with a captured step (bench/bench_decode.py).
  4. one whole TRB optimizer step of the 0.6B/4B pair (and 1.7B/8B with --pairs) with the
     transformers teacher backend on the same device, at two response lengths; the linear fit in
     the response length projects the 1,024-token step and 200 steps of each recipe.
Random weights: memory and time depend on the shapes, not the values (a random student never
stops early, so every row decodes the full length: the worst case).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.bench_decode import SHAPES, bench
from bench.common import REPO, Section, base_parser, build_random, limit_threads, machine_info, median, report
from bench.whole_step import measure_pair

VOCAB, TOP_K = 151_936, 20
NARROW = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=128, head_dim=16)
GIB = 1024**3


def qwen3(name: str, narrow: bool = False, **overrides: int):
    """The published Qwen3 shape `name` (bench_decode.SHAPES: 0.6B, 1.7B, 4B, 8B), or a narrow stand-in
    with the same vocabulary (the lm_head and the loss keep their real size)."""
    from transformers import Qwen3Config

    shape = {**SHAPES[name], **(NARROW if narrow else {}), **overrides}
    return Qwen3Config(pad_token_id=0, bos_token_id=1, eos_token_id=2, **shape)


def batch(rows: int, tokens: int, vocab: int, device: str, prompt: int = 176):
    """Token ids, attention, loss mask and random top-k targets of a rollout of `rows` x `tokens`."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (rows, tokens), generator=g)
    attention = torch.ones_like(ids)
    loss_mask = torch.zeros_like(ids, dtype=torch.bool)
    loss_mask[:, prompt - 1 : -1] = True
    logits = torch.randn(rows, tokens, 4 * TOP_K, generator=g)  # a peaked teacher over 4k random ids
    lps, cols = (logits * 3).log_softmax(-1).topk(TOP_K, -1)
    target_ids = torch.randint(3, vocab, (rows, tokens, 4 * TOP_K), generator=g).gather(-1, cols)
    tail = torch.log1p(-lps.exp().sum(-1).clamp_max(1 - 1e-6))
    return [t.to(device) for t in (ids, attention, loss_mask, target_ids, lps, tail)]


def micro_step(lm: torch.nn.Module, rows: int, tokens: int, precision: str, chunk: int | None,
               device: str) -> Callable[[], float]:
    """One forward + loss + backward + AdamW step of `rows` x `tokens`, as the trainer runs it."""
    from student_trainer.training.student_model import StudentLoss, compute_dtype

    loss_module = StudentLoss(lm, chunk, autocast_dtype=compute_dtype(precision))
    optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-6)
    args = batch(rows, tokens, lm.config.vocab_size, device)

    def step() -> float:
        loss = loss_module(*args, n_tokens=float(args[2].sum()))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


# ---- 1. loss memory -----------------------------------------------------------------------------
def _loss_memory_child(chunk: int | None, rows: int, tokens: int) -> None:
    """Run in a fresh process: prints {"peak": bytes above the set-up state, "seconds": ...}."""
    lm = build_random(qwen3("0.6B", narrow=True, num_hidden_layers=1), "cpu")
    loss_module_step = micro_step(lm, rows, tokens, "fp32", chunk, "cpu")
    base = _rss()
    started = time.perf_counter()
    loss_module_step()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak": peak - base, "seconds": seconds}))


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def loss_memory(device: str, rows: int = 4, tokens: int = 1200) -> Section:
    copy = rows * tokens * VOCAB * 4
    section = Section(f"Loss memory: forward + loss + backward, {rows} x {tokens} tokens, vocab {VOCAB:,}",
                      "1-layer 64-wide Qwen3 body, top-20 targets, float32; peak above the model "
                      f"({'peak RSS of a fresh process per variant' if device == 'cpu' else 'max_memory_allocated'})"
                      f"; one float32 copy of the logits is {copy / GIB:.2f} GiB. Ratio: before / variant.")
    results = {}
    for name, chunk in (("full logits (before)", 0), ("chunked (auto)", None)):
        if device == "cpu":
            out = subprocess.run([sys.executable, "-m", "bench.bench_scale", "--loss-memory-child", str(chunk),
                                  "--loss-rows", str(rows)], cwd=REPO, capture_output=True, text=True, check=True)
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        else:
            lm = build_random(qwen3("0.6B", narrow=True, num_hidden_layers=1), device)
            step = micro_step(lm, rows, tokens, "fp32", chunk, device)
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            step()
            torch.cuda.synchronize()
            results[name] = {"peak": torch.cuda.max_memory_allocated() - base,
                             "seconds": time.perf_counter() - started}
            del lm, step
            torch.cuda.empty_cache()
    before = results["full logits (before)"]["peak"]
    for name, r in results.items():
        figure = f"{r['peak'] / GIB:.2f} GiB ({r['peak'] / copy:.2f} logit copies), {r['seconds']:.2f} s"
        chunked = name.startswith("chunked")
        section.add(name, figure, before / max(r["peak"], 1) if chunked else None, ">= 5" if chunked else "")
    return section


# ---- 2. micro-step of the students --------------------------------------------------------------
def micro_steps(device: str, narrow: bool, rows: int = 8, tokens: int = 1200) -> Section:
    section = Section(f"Student micro-step: {rows} rows x {tokens} tokens",
                      f"forward + top-{TOP_K} reverse KL + backward + AdamW, random Qwen3 "
                      f"{'narrow stand-ins' if narrow else 'shapes'} on {device}; median of 3 after a warm-up. "
                      "Ratio: seconds of the variant / seconds before.")
    variants = {"fp32, full logits (before)": ("fp32", 0), "fp32, chunked": ("fp32", None),
                "bf16-mixed, chunked": ("bf16-mixed", None)}
    for student in ("0.6B", "1.7B"):
        before = None
        for name, (precision, chunk) in variants.items():
            seconds, peak = _timed_step(qwen3(student, narrow), device, rows, tokens, precision, chunk)
            before = before if before is not None else seconds
            figure = ("out of memory" if seconds is None else
                      f"{seconds:.3f} s" + ("" if peak is None else f", peak {peak / GIB:.1f} GiB"))
            ratio = seconds / before if seconds is not None and before else None
            section.add(f"{student}: {name}", figure, ratio)
            if student == "1.7B" and name.startswith("bf16") and device == "cuda" and not narrow:
                fits = None if peak is None else peak / (40 * GIB)
                section.add("1.7B bf16-mixed peak / 40 GiB", "out of memory" if peak is None else
                            f"{peak / GIB:.1f} GiB", fits if fits is not None else 99.0, "<= 1")
    return section


def _timed_step(config, device: str, rows: int, tokens: int, precision: str, chunk: int | None):
    """(median seconds of 3 steps after one warm-up, peak bytes) or (None, None) out of memory."""
    lm = step = None
    try:
        lm = build_random(config, device)
        step = micro_step(lm, rows, tokens, precision, chunk, device)
        step()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(3):
            started = time.perf_counter()
            step()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
        return median(times), peak
    except torch.OutOfMemoryError:
        return None, None
    finally:
        del lm, step
        if device == "cuda":
            torch.cuda.empty_cache()


# ---- 3. decode ----------------------------------------------------------------------------------
def decode(device: str, narrow: bool) -> Section:
    """Student steps of the 1.7B shape at 8/32/64 rows and 8-row teacher extends of the 8B shape (bf16):
    the eager decoder (before) vs the static cache, and with the step captured as a CUDA graph."""
    cuda = device == "cuda"
    kinds = ["eager", "static", "graph"] if cuda else ["eager", "static"]
    dtype, steps, prompt = (torch.bfloat16, 64, 128) if cuda else (torch.float32, 16, 32)
    student, teacher = ("1.7B", "8B") if cuda and not narrow else ("quick", "quick")
    section = Section("Decode step: eager decoder (before) vs static cache vs captured CUDA graph",
                      f"random Qwen3 {student} student (every row one token a step, greedy token to the host) "
                      f"and {teacher} teacher session extends (top-{TOP_K} to the host); {str(dtype)[6:]}, prompt "
                      f"{prompt}, {steps} timed steps after 3, median of 2 rounds (bench/bench_decode.py). "
                      "Ratio: eager ms / variant ms.")
    rows = bench([student], [8, 32, 64], kinds, steps, 2, device, dtype, "student", prompt)
    rows += bench([teacher], [8], kinds, steps, 2, device, dtype, "teacher", prompt)
    for row in rows:
        for kind in kinds:
            target = ""
            if kind == kinds[-1] and cuda and not narrow:
                target = ">= 4" if (row["pattern"], row["rows"]) == ("student", 32) else (
                    ">= 3" if row["pattern"] == "teacher" else "")
            section.add(f"{row['model']} {row['pattern']}, {row['rows']} rows: {kind}", f"{row[kind]:.2f} ms",
                        row["eager"] / row[kind] if kind != "eager" else None, target)
    return section


# ---- 4. whole optimizer steps and the projection --------------------------------------------------
RECIPES = {"0.6b-4b": ("0.6B", "4B", "recipes/qwen3/trb-0.6b-4b.yaml"),
           "1.7b-8b": ("1.7B", "8B", "recipes/qwen3/trb-1.7b-8b.yaml")}


def whole_steps(device: str, narrow: bool, pairs: list[str], lengths: tuple[int, int]) -> Section:
    section = Section("Whole TRB optimizer step and the projected recipe run",
                      f"the recipe's batch, accum_steps, precision and top-k at ε0 (teacher asked at every "
                      f"token); student in process, `trb-teacher serve` (transformers backend) on {device}; "
                      f"{'narrow stand-ins' if narrow else 'Qwen3 shapes'}; random students never stop early. "
                      "Projection: the line through the two lengths, at 1,024 new tokens; ratio: hours of "
                      "200 steps.")
    for pair in pairs:
        student, teacher, recipe = RECIPES[pair]
        fit = measure_pair(qwen3(student, narrow), qwen3(teacher, narrow), REPO / recipe, device, lengths)
        for n, seconds, tps in fit.points:
            section.add(f"{pair}: step at {n} new tokens", f"{seconds:.2f} s, {tps:,.0f} generated tok/s")
        hours = 200 * fit.at(1024) / 3600
        target = "<= 3" if pair == "1.7b-8b" and device == "cuda" and not narrow else ""
        section.add(f"{pair}: 200 steps at 1,024 new tokens (projected)", f"{fit.at(1024):.1f} s a step", hours,
                    target)
    return section


def main() -> None:
    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sections", default="loss,micro,decode,whole", help="comma-separated subset")
    ap.add_argument("--pairs", default="0.6b-4b,1.7b-8b")
    ap.add_argument("--out", type=Path, default=None, help="also write the report to DIR/bench_scale.md")
    ap.add_argument("--loss-rows", type=int, default=4, help="rows of 1,200 tokens in the loss-memory section")
    ap.add_argument("--loss-memory-child", default=None, help=argparse_hidden())
    args = ap.parse_args()
    if args.loss_memory_child is not None:
        chunk = None if args.loss_memory_child == "None" else int(args.loss_memory_child)
        limit_threads(args.threads)
        _loss_memory_child(chunk, args.loss_rows, 1200)
        return
    limit_threads(args.threads)
    narrow = args.quick or args.device == "cpu"
    wanted = args.sections.split(",")
    sections = []
    started = time.perf_counter()
    if "loss" in wanted:
        sections.append(loss_memory(args.device, args.loss_rows))
    if "micro" in wanted:
        sections.append(micro_steps(args.device, narrow, *((8, 1200) if not narrow else (2, 128))))
    if "decode" in wanted:
        sections.append(decode(args.device, narrow))
    if "whole" in wanted:
        lengths = (8, 24) if narrow else (128, 384)
        sections.append(whole_steps(args.device, narrow, args.pairs.split(","), lengths))
    info = machine_info(args.threads)
    if args.device == "cuda":
        info["device"] = torch.cuda.get_device_name(0)
    command = " ".join(["python -m bench.bench_scale", *sys.argv[1:]])
    text = f"Produced by `{command}` in {time.perf_counter() - started:.0f} s.\n\n{report(sections, info)}"
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_scale.md").write_text(text)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
