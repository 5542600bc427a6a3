"""`trb-train --config FILE [--set key=value ...] [--resume | --check | --print-config]`, and `trb-train export`."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import threading
from typing import Any

from shared.model_source import ModelSourceError
from student_trainer.config import ConfigError, load_config
from student_trainer.config_doc import methods_help


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trb-train", description="On-policy distillation with TRB.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=methods_help() + "\n\nevery config key, its type, default and meaning: docs/config.md, "
        "or trb-train --print-config\n\ntrb-train export --help: score a dataset once for method.name=offline_kd\n")
    parser.add_argument("--config", help="YAML config (see recipes/).")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="Override a config key, e.g. --set train.steps=10 --set method.name=opd.")
    parser.add_argument("--resume", action="store_true", help="Continue from the latest checkpoint in out_dir.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true",
                      help="Dry run: validate the config, load the student, reach the teacher, check the tokenizers "
                      "and the data, print what the run would do, and exit without training or writing anything.")
    mode.add_argument("--print-config", action="store_true",
                      help="Print the resolved config (the defaults without --config/--set) as YAML with every "
                      "key's meaning, type and default, and exit.")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["export"]:  # a dataset scored once by a teacher server, for method.name=offline_kd
        from student_trainer.teacher.export import main as export_main

        export_main(argv[1:])
        return
    parser = _parser()
    args = parser.parse_args(argv)
    if args.print_config and args.config is None and not args.set:
        from student_trainer.config_doc import commented_yaml

        print(commented_yaml(), end="")
        return
    if args.config is None and not args.set:
        parser.error("give --config FILE (and/or --set overrides)")
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as exc:
        sys.exit(f"trb-train: {exc}")
    if args.print_config:
        from student_trainer.config_doc import commented_yaml

        print(commented_yaml(cfg), end="")
        return
    from student_trainer.startup import check_sources

    try:
        check_sources(cfg, student=not args.resume)  # before the slow imports below
    except ModelSourceError as exc:
        sys.exit(f"trb-train: {exc}")
    from student_trainer.teacher.client import TeacherError
    from student_trainer.training.loop import TrainingError, train_sync

    # `kill` (SIGTERM: a scheduler's preemption, a job's time limit) ends a run as Ctrl-C does: the local
    # teacher and the producer process stop with it instead of outliving it, and the last checkpoint stays.
    previous = _sigterm_as_interrupt()
    try:
        if args.check:
            from student_trainer.dry_run import check

            lines = asyncio.run(check(cfg, resume=args.resume))
            print("trb-train --check: ready to train; nothing was trained or written.\n" + "\n".join(lines))
        else:
            train_sync(cfg, resume=args.resume)
    except (TrainingError, TeacherError, ModelSourceError, ConfigError) as exc:
        sys.exit(f"trb-train: {exc}")
    except KeyboardInterrupt:
        sys.exit("trb-train: interrupted; the last checkpoint is intact (use --resume)")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _sigterm_as_interrupt() -> Any:
    """SIGTERM raises KeyboardInterrupt (the previous handler returned), in the main thread only: Python's
    default for SIGTERM ends the process without unwinding, so no `finally` would stop the children."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, signal.default_int_handler)


if __name__ == "__main__":
    main()
