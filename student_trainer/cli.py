"""`trb-train --config FILE [--set key=value ...] [--resume]`."""

from __future__ import annotations

import argparse
import sys

from student_trainer.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="trb-train", description="On-policy distillation with TRB.")
    parser.add_argument("--config", help="YAML config (see recipes/).")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="Override a config key, e.g. --set train.steps=10 --set method.name=opd.")
    parser.add_argument("--resume", action="store_true", help="Continue from the latest checkpoint in out_dir.")
    args = parser.parse_args(argv)
    if args.config is None and not args.set:
        parser.error("give --config FILE (and/or --set overrides)")
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as exc:
        sys.exit(f"trb-train: {exc}")
    from student_trainer.teacher_client import TeacherError
    from student_trainer.train import TrainingError, train_sync

    try:
        train_sync(cfg, resume=args.resume)
    except (TrainingError, TeacherError) as exc:
        sys.exit(f"trb-train: {exc}")
    except KeyboardInterrupt:
        sys.exit("trb-train: interrupted; the last checkpoint is intact (use --resume)")


if __name__ == "__main__":
    main()
