"""A documented sweep: one method over a grid of overrides, several seeds, one shared teacher.

What `make reproduce` cannot say is *why* a method leads or not; this runs the knobs the method
depends on (for TRB: the initial budget ε0, the warmup length K, how weak the student starts) and
writes a table of final accuracy and area under the accuracy curve per grid point.

    python scripts/sweep.py --method trb --grid method.eps0=0.03,0.3,1.0 --grid method.horizon=100,200 \
        --seeds 2 --out docs/sweep.md
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scripts.reproduce import SWEEP_SEED_BASE, early_cells, fmt_ci, run_one, run_stats  # noqa: E402
from student_trainer.config import load_config  # noqa: E402
from student_trainer.reports.stats import EARLY_KEYS  # noqa: E402
from student_trainer.teacher.local import LocalTeacher  # noqa: E402


def grid_points(grid: list[str]) -> list[list[str]]:
    """`key=a,b` flags -> every combination as a list of `key=value` overrides."""
    axes = [[f"{key}={v}" for v in values.split(",")] for key, values in (g.split("=", 1) for g in grid)]
    return [list(p) for p in itertools.product(*axes)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "arithmetic" / "trb-weak.yaml"))
    parser.add_argument("--method", default="trb")
    parser.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2,...")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--root", default=str(REPO / "runs" / "sweep"))
    parser.add_argument("--out", default=str(REPO / "docs" / "sweep.md"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--teacher-device", default="cpu",
                        help="where the shared teacher runs (GPU mode: cuda, with --set student.device=cuda)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep finished runs under --root (same recipe, grid and overrides!), run only the rest")
    args = parser.parse_args()
    points = grid_points(args.grid)
    for point in points:  # fail fast on a bad key or value before any run starts
        load_config(args.recipe, args.set + point)
    cfg = load_config(args.recipe, args.set)
    root = Path(args.root)
    for i in range(len(points)):
        (root / f"point{i}").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    # tuning seeds (rollouts and prompt draws) that no reported run of scripts/reproduce.py uses
    seeds = range(SWEEP_SEED_BASE, SWEEP_SEED_BASE + args.seeds)
    jobs = [(i, s) for i in range(len(points)) for s in seeds]
    with LocalTeacher(cfg.teacher.model, "--device", args.teacher_device,
                      threads=1 if args.teacher_device == "cpu" else None, log=root / "teacher.log") as teacher, \
            ThreadPoolExecutor(args.parallel) as pool:
        futures = {(i, s): pool.submit(run_one, args.recipe, args.method, s, teacher.url, root / f"point{i}",
                                       args.set + points[i], args.reuse) for i, s in jobs}
        outs = {job: f.result() for job, f in futures.items()}
    lines = [f"# Sweep: {args.method} on the arithmetic task", "",
             f"`python scripts/sweep.py {' '.join(sys.argv[1:])}`; {args.seeds} seeds per point (tuning seeds "
             f"{seeds.start}-{seeds.stop - 1}: rollouts and training prompts that no reported run uses; the eval "
             "benchmark is the report's), "
             f"{(time.perf_counter() - started) / 60:.1f} min on {os.cpu_count()} cores.", "",
             "Mean [95% t-interval] over seeds. The last columns are the early rollouts: means over "
             "optimizer steps 1-K of the point (K = method.horizon) of the teacher's log-likelihood of the "
             "sampled tokens, the realised KL(μ‖π_S) and the share of positions with β = 1.", "",
             "| overrides | final accuracy | area under accuracy curve | teacher log-lik | KL(μ‖π_S) | share β = 1 |",
             "| --- | --- | --- | --- | --- | --- |"]
    for i, point in enumerate(points):
        first = load_config(args.recipe, args.set + point).method.horizon
        stats = [run_stats(outs[(i, s)], first) for s in seeds]
        lines.append(f"| `{' '.join(point)}` | {fmt_ci([r['final'] for r in stats])} | "
                     f"{fmt_ci([r['auc'] for r in stats])} | {early_cells(stats, EARLY_KEYS[:3])} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
