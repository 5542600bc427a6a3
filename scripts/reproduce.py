"""`make reproduce`: every method of docs/methods.md on the arithmetic task, several seeds each.

OPD, TRB, fixed-ε, SKD, SFT warmup (token cross-entropy), teacher warmup (reverse KL on teacher
rollouts: what `sft_warmup` meant before) and Veto.

Every run gets the same optimizer steps, batch, max_new_tokens and eval set; they all share one
teacher server (as experiments do in practice). Writes `docs/results.md` and a comparison plot.

    python scripts/reproduce.py [--seeds 3] [--parallel 2] [--set train.steps=150 ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from student_trainer.config import load_config  # noqa: E402
from student_trainer.local_teacher import LocalTeacher  # noqa: E402
from student_trainer.plots import plot_comparison  # noqa: E402
from student_trainer.run_log import read_metrics  # noqa: E402

METHODS = ["opd", "trb", "fixed_eps", "skd", "sft_warmup", "teacher_warmup", "veto"]


def finished(out: Path) -> bool:
    """A run whose metrics end with the final record (an interrupted run has none)."""
    path = out / "metrics.jsonl"
    return path.exists() and bool(read_metrics(path)) and read_metrics(path)[-1].get("final", False)


def run_one(recipe: str, method: str, seed: int, url: str, root: Path, extra: list[str],
            reuse: bool = False) -> Path:
    out = root / f"{method}-seed{seed}"
    if reuse and finished(out):
        return out
    sets = [f"method.name={method}", f"train.seed={seed}", f"teacher.url={url}", f"train.out_dir={out}",
            "train.progress=false", "train.save_every=0", *extra]
    cmd = [sys.executable, "-m", "student_trainer.cli", "--config", recipe] + [a for s in sets for a in ("--set", s)]
    log = (root / f"{method}-seed{seed}.log").open("w")
    proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} seed {seed} failed; see {log.name}")
    return out


def curve(out: Path) -> tuple[list[int], list[float]]:
    evals = [r for r in read_metrics(out / "metrics.jsonl") if "eval_accuracy" in r]
    return [r["step"] for r in evals], [r["eval_accuracy"] for r in evals]


def area(steps: list[int], acc: list[float]) -> float:
    """Mean accuracy over training: trapezoid area under the curve divided by the step span."""
    total = sum((steps[i + 1] - steps[i]) * (acc[i] + acc[i + 1]) / 2 for i in range(len(steps) - 1))
    return total / max(1, steps[-1] - steps[0])


def fmt(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.3f}"


def write_results(runs: dict[str, list[Path]], cfg_text: str, wall_s: float, dest: Path, extra: list[str]) -> None:
    rows = []
    for method, outs in runs.items():
        finals = [curve(o)[1][-1] for o in outs]
        aucs = [area(*curve(o)) for o in outs]
        kls = [read_metrics(o / "metrics.jsonl")[-1]["probe_kl"] for o in outs]
        tokens = [sum(r.get("tokens", 0) for r in read_metrics(o / "metrics.jsonl")) for o in outs]
        rows.append((method, fmt(finals), fmt(aucs), fmt(kls), f"{statistics.mean(tokens):,.0f}",
                     statistics.mean(aucs)))
    rows.sort(key=lambda r: -r[-1])
    start = curve(next(iter(runs.values()))[0])[1][0]
    lines = [
        "# Results: the paper's comparison on the arithmetic task (CPU)", "",
        "Produced by `make reproduce` (`python scripts/reproduce.py " + " ".join(sys.argv[1:]) + "`).",
        f"Machine: {platform.machine()}, {platform.processor() or platform.system()}, "
        f"{__import__('os').cpu_count()} cores; wall time {wall_s / 60:.1f} min for all runs.", "",
        f"Student accuracy before distillation: {start:.3f} (greedy pass@1, same eval set for every run).", "",
        "| method | final accuracy | area under accuracy curve | final probe KL(π_S‖π_T) | generated tokens |",
        "| --- | --- | --- | --- | --- |",
        *[f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} |" for r in rows], "",
        f"Mean ± std over {len(next(iter(runs.values())))} seeds, sorted by area under the curve. "
        "What moves the ordering (ε0, warmup length K, how weak the student starts): [sweep.md](sweep.md).", "",
        "![accuracy by method](results.png)", "",
        "## Hyperparameters", "", "Recipe (overrides: `" + " ".join(extra) + "`):", "", "```yaml", cfg_text.strip(),
        "```", "",
    ]
    dest.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "arithmetic" / "trb.yaml"))
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--root", default=str(REPO / "runs" / "reproduce"))
    parser.add_argument("--results", default=str(REPO / "docs" / "results.md"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--reuse", action="store_true",
                        help="keep finished runs under --root (same recipe and overrides!), run only the rest")
    args = parser.parse_args()
    cfg = load_config(args.recipe, args.set)  # fail fast on a bad recipe or override
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with LocalTeacher(cfg.teacher.model, threads=1, log=root / "teacher.log") as teacher:
        jobs = [(m, s) for s in range(args.seeds) for m in args.methods]
        with ThreadPoolExecutor(args.parallel) as pool:
            futures = {job: pool.submit(run_one, args.recipe, *job, teacher.url, root, args.set, args.reuse)
                       for job in jobs}
            outs = {job: f.result() for job, f in futures.items()}
    runs = {m: [outs[(m, s)] for s in range(args.seeds)] for m in args.methods}
    results = Path(args.results)
    write_results(runs, Path(args.recipe).read_text(), time.perf_counter() - started, results, args.set)
    plot_comparison(runs, results.with_name("results.png"))
    print(results.read_text())
    (root / "summary.json").write_text(json.dumps({m: [str(p) for p in ps] for m, ps in runs.items()}))


if __name__ == "__main__":
    main()
