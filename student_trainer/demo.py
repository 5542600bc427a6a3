"""`make demo`: TRB distillation of the shipped tiny student from the shipped tiny teacher, on CPU.

Starts the teacher server as a subprocess on 127.0.0.1, trains with the recipe in
`recipes/arithmetic/trb.yaml`, prints accuracy before and after, and writes a plot of accuracy,
KL, ε and mean β into the run folder. Extra `--set key=value` arguments override the recipe.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from student_trainer.config import ConfigError, load_config
from student_trainer.reports.plots import plot_run
from student_trainer.training.loop import train_sync

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "arithmetic" / "trb.yaml"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="trb-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(RECIPE))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as exc:
        sys.exit(f"trb-demo: {exc}")
    for path in (cfg.student.path, cfg.teacher.model):
        if path and not Path(path).exists():
            sys.exit(f"trb-demo: {path} not found; run from the repository root")
    summary = train_sync(cfg)
    png = plot_run(Path(cfg.train.out_dir))
    before, after = summary.get("initial_accuracy"), summary["final_accuracy"]
    print(f"\nstudent accuracy (greedy pass@1, {cfg.data.eval_size} held-out problems): "
          f"{before:.1%} -> {after:.1%}" if before is not None else f"\nfinal accuracy {after:.1%}")
    print(f"probe KL(π_S‖π_T): {summary.get('initial_probe_kl', float('nan')):.4f} -> {summary['final_probe_kl']:.4f}")
    print(f"metrics: {cfg.train.out_dir}/metrics.jsonl   plot: {png}")


if __name__ == "__main__":
    main()
