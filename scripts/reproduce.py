"""`make reproduce`: every method that rolls out (all of docs/methods.md but offline_kd), several seeds each.

OPD, TRB, fixed-ε, SKD, SFT warmup (token cross-entropy), teacher warmup (reverse KL on teacher
rollouts: what `sft_warmup` meant before) and Veto, by default in the weak-student setting
(recipes/arithmetic/trb-weak.yaml), where the student starts far from the teacher per token.

Every run gets the same optimizer steps, batch, max_new_tokens and eval set; they all share one
teacher server (as experiments do in practice). Writes `docs/results.md` (95% intervals over seeds,
TRB's paired differences against each baseline, the quality of the early rollouts) and a plot.

    python scripts/reproduce.py [--seeds 5] [--parallel 2] [--set train.steps=150 ...]
    # GPU mode: the teacher and every student on the device, more runs at once
    python scripts/reproduce.py --teacher-device cuda --set student.device=cuda --parallel 8
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from student_trainer.config import load_config  # noqa: E402
from student_trainer.reports.metrics_file import read_metrics  # noqa: E402
from student_trainer.reports.plots import plot_comparison  # noqa: E402
from student_trainer.reports.stats import EARLY_KEYS, area_under_curve, early_quality, mean_ci95, paired_bootstrap_ci95  # noqa: E402,E501
from student_trainer.teacher.local import LocalTeacher  # noqa: E402

METHODS = ["opd", "trb", "fixed_eps", "skd", "sft_warmup", "teacher_warmup", "veto"]
# Seed s draws its own rollouts (train.seed) and its own training prompts (data.seed); every run of every
# method is evaluated on one fixed benchmark and probe (data.eval_seed), apart from both. scripts/sweep.py
# tunes on seeds from SWEEP_SEED_BASE on, which no reported run uses.
EVAL_SEED = 1000
SWEEP_SEED_BASE = 100


def finished(out: Path) -> bool:
    """A run whose metrics end with the final record (an interrupted run has none)."""
    path = out / "metrics.jsonl"
    return path.exists() and bool(read_metrics(path)) and read_metrics(path)[-1].get("final", False)


def run_one(recipe: str, method: str, seed: int, url: str, root: Path, extra: list[str],
            reuse: bool = False, overrides: list[str] | None = None) -> Path:
    """Run `method` (a method name, or a variant's label with its `overrides`) at `seed` under `root`."""
    out = root / f"{method}-seed{seed}"
    if reuse and finished(out):
        return out
    sets = [*(overrides or [f"method.name={method}"]), f"train.seed={seed}", f"data.seed={seed}",
            f"data.eval_seed={EVAL_SEED}", f"teacher.url={url}",
            f"train.out_dir={out}", "train.progress=false", "train.save_every=0", *extra]
    cmd = [sys.executable, "-m", "student_trainer.cli", "--config", recipe] + [a for s in sets for a in ("--set", s)]
    log = (root / f"{method}-seed{seed}.log").open("w")
    proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} seed {seed} failed; see {log.name}")
    return out


def fmt_ci(xs: list[float]) -> str:
    """Mean [95% t-interval] over seeds."""
    if len(xs) < 2:
        return f"{xs[0]:.3f}"
    mean, half = mean_ci95(xs)
    return f"{mean:.3f} [{mean - half:.3f}, {mean + half:.3f}]"


def run_stats(out: Path, first_steps: int) -> dict[str, Any]:
    """What the report needs from one finished run (its metrics read once)."""
    records = read_metrics(out / "metrics.jsonl")
    evals = [r for r in records if "eval_accuracy" in r]
    steps, acc = [r["step"] for r in evals], [r["eval_accuracy"] for r in evals]
    return {"final": acc[-1], "auc": area_under_curve(steps, acc), "start": acc[0], "probe_kl": records[-1]["probe_kl"],
            "tokens": sum(r.get("tokens", 0) for r in records), "early": early_quality(records, first_steps)}


def paired_cells(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> str:
    """`Δ final | Δ area | n of N` for runs a - b paired by seed: means with 95% bootstrap intervals,
    and the seeds where a's area is larger."""
    cells = []
    for key in ("final", "auc"):
        mean, lo, hi = paired_bootstrap_ci95([r[key] for r in a], [r[key] for r in b])
        cells.append(f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    ahead = sum(x["auc"] > y["auc"] for x, y in zip(a, b, strict=True))
    return f"{cells[0]} | {cells[1]} | {ahead} of {len(a)}"


def early_cells(stats: list[dict[str, Any]], keys: tuple[str, ...] = EARLY_KEYS) -> str:
    """The early-rollout means of `keys` over a row's runs; '-' where the method has no such quantity."""
    cells = []
    for key in keys:
        values = [r["early"][key] for r in stats if key in r["early"]]
        cells.append(f"{statistics.mean(values):.3f}" if values else "-")
    return " | ".join(cells)


def parse_variant(text: str) -> tuple[str, list[str]]:
    """`label:key=v,key=v` -> (label, overrides): one more row of the comparison, e.g. TRB at another budget."""
    label, _, sets = text.partition(":")
    overrides = [x for x in sets.split(",") if x]
    if not label or not any(o.startswith("method.name=") for o in overrides):
        raise SystemExit(f"--variant {text!r}: expected LABEL:method.name=...,KEY=VALUE,...")
    return label, overrides


def write_results(runs: dict[str, list[Path]], cfg_text: str, wall_s: float, dest: Path, extra: list[str],
                  first_steps: int | dict[str, int], title: str, reused: bool = False,
                  variants: dict[str, list[str]] | None = None) -> None:
    """docs/results.md; `first_steps` (K: the early-rollout window) per row or one for all."""
    def k_of(m: str) -> int:
        return first_steps[m] if isinstance(first_steps, dict) else first_steps

    stats = {m: [run_stats(o, k_of(m)) for o in outs] for m, outs in runs.items()}
    seeds = len(next(iter(runs.values())))
    order = sorted(stats, key=lambda m: -statistics.mean(r["auc"] for r in stats[m]))
    lines = [
        f"# Results: {title}", "",
        "Produced by `make reproduce` (`python scripts/reproduce.py " + " ".join(sys.argv[1:]) + "`).",
        f"Machine: {platform.machine()}, {platform.processor() or platform.system()}, "
        f"{os.cpu_count()} cores; wall time {wall_s / 60:.1f} min "
        + ("for this invocation (it reused finished runs)." if reused else f"for all {seeds * len(runs)} runs."), "",
        f"Student accuracy before distillation: {next(iter(stats.values()))[0]['start']:.3f} (greedy pass@1 on "
        "the held-out eval set, the same problems for every run).", "",
        f"Mean and 95% t-interval over {seeds} seeds, sorted by the area under the accuracy curve (the mean "
        "accuracy over training).", "",
        "| method | final accuracy | area under accuracy curve | final probe KL(π_S‖π_T) | generated tokens |",
        "| --- | --- | --- | --- | --- |",
        *[f"| {m} | {fmt_ci([r['final'] for r in stats[m]])} | {fmt_ci([r['auc'] for r in stats[m]])} | "
          f"{fmt_ci([r['probe_kl'] for r in stats[m]])} | {statistics.mean(r['tokens'] for r in stats[m]):,.0f} |"
          for m in order], "",
        "![accuracy and probe KL by method](results.png)", "",
    ]
    trbs = [m for m in order if m.startswith("trb")]
    if trbs and seeds > 1:
        lines += ["## TRB against each baseline, paired by seed", "",
                  "Seed s of every method starts from the same student, samples its rows from the same "
                  "(seed, step, row) streams and is evaluated on the same problems, so the differences are "
                  "paired. Mean of the per-seed differences TRB − baseline and a 95% bootstrap interval "
                  "(seeds resampled with replacement, 10,000 times); the last column counts the seeds "
                  "where TRB's area is larger.", "",
                  "| TRB row | baseline | Δ final accuracy | Δ area under curve | TRB ahead (area) |",
                  "| --- | --- | --- | --- | --- |"]
        for t in trbs:
            for m in order:
                if m in trbs:
                    continue
                lines.append(f"| {t} | {m} | {paired_cells(stats[t], stats[m])} |")
        lines.append("")
    window = f"1-{first_steps}" if isinstance(first_steps, int) else "1-K, K = each row's method.horizon"
    lines += [f"## The early rollouts (optimizer steps {window})", "",
              "Means over the steps and seeds of each method's behavior diagnostics: the teacher's "
              "log-likelihood of the sampled tokens (the quality of the prefixes it supervises), the realised "
              "KL(μ‖π_S) of the behavior, the share of positions where the teacher was inside the ball "
              "(β = 1) and the mean β; '-' where the method has no such quantity.", "",
              "| method | teacher log-lik / token | KL(μ‖π_S) | share β = 1 | mean β |",
              "| --- | --- | --- | --- | --- |"]
    for m in order:
        lines.append(f"| {m} | {early_cells(stats[m])} |")
    lines += ["", "## Hyperparameters", "", "Recipe (overrides: `" + " ".join(extra) + "`):", "", "```yaml",
              cfg_text.strip(), "```", ""]
    if variants:
        lines += ["Rows that are variants (their overrides on top of the recipe's):", "",
                  *[f"- `{label}`: `{' '.join(o)}`" for label, o in variants.items()], ""]
    dest.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "arithmetic" / "trb-weak.yaml"))
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--root", default=str(REPO / "runs" / "reproduce"))
    parser.add_argument("--results", default=str(REPO / "docs" / "results.md"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--teacher-device", default="cpu",
                        help="where the shared teacher runs (GPU mode: cuda, with --set student.device=cuda)")
    parser.add_argument("--title", default="the paper's comparison, weak student on the arithmetic task (CPU)")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL:method.name=M,KEY=VALUE,...",
                        help="one more row, e.g. trb_eps1_k200:method.name=trb,method.eps0=1.0,method.horizon=200")
    parser.add_argument("--reuse", action="store_true",
                        help="keep finished runs under --root (same recipe and overrides!), run only the rest")
    args = parser.parse_args()
    cfg = load_config(args.recipe, args.set)  # fail fast on a bad recipe or override
    variants = dict(parse_variant(v) for v in args.variant)
    horizons = {m: cfg.method.horizon for m in args.methods}
    for label, overrides in variants.items():
        horizons[label] = load_config(args.recipe, args.set + overrides).method.horizon
    labels = [*args.methods, *variants]
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with LocalTeacher(cfg.teacher.model, "--device", args.teacher_device,
                      threads=1 if args.teacher_device == "cpu" else None, log=root / "teacher.log") as teacher:
        jobs = [(m, s) for s in range(args.seeds) for m in labels]
        with ThreadPoolExecutor(args.parallel) as pool:
            futures = {job: pool.submit(run_one, args.recipe, *job, teacher.url, root, args.set, args.reuse,
                                        variants.get(job[0])) for job in jobs}
            outs = {job: f.result() for job, f in futures.items()}
    runs = {m: [outs[(m, s)] for s in range(args.seeds)] for m in labels}
    results = Path(args.results)
    write_results(runs, Path(args.recipe).read_text(), time.perf_counter() - started, results, args.set,
                  first_steps=horizons, title=args.title, reused=args.reuse, variants=variants)
    plot_comparison(runs, results.with_name("results.png"))
    print(results.read_text())
    (root / "summary.json").write_text(json.dumps({m: [str(p) for p in ps] for m, ps in runs.items()}))


if __name__ == "__main__":
    main()
