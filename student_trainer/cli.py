"""`trb-train --config FILE [--set key=value ...] [--resume]`."""

from __future__ import annotations

import argparse
import sys
import textwrap

from student_trainer.config import ConfigError, load_config

# (method.name, behavior policy, loss, knobs under method.*, teacher calls): docs/methods.md has the same table.
METHODS = (
    ("opd", "π_S", "reverse KL(π_S‖π̂_T)", "-",
     "one /v1/score per batch, after the rollouts"),
    ("trb", "μ_β* (closest to π_T within KL ε of π_S), ε annealed to 0", "reverse KL", "eps0, horizon, schedule",
     "a session (one extend per token) while ε > 0, then as opd"),
    ("fixed_eps", "μ_β* at a constant ε = eps0", "reverse KL", "eps0",
     "a session (one extend per token) every step"),
    ("skd", "π_S proposes; kept if in the teacher's top-skd_top_k, else a teacher draw", "reverse KL", "skd_top_k",
     "a session (one extend per token) every step"),
    ("sft_warmup", "π̂_T for horizon steps, then π_S",
     "token cross-entropy on the teacher's tokens (sft_loss=cross_entropy) or forward KL(π̂_T‖π_S) "
     "(sft_loss=forward_kl), then reverse KL", "horizon, sft_loss",
     "a session (one extend per token) for horizon steps, then as opd"),
    ("teacher_warmup", "π̂_T for horizon steps, then π_S", "reverse KL throughout", "horizon",
     "as sft_warmup"),
    ("veto", "π_S", "forward KL(q_β‖π_S) or reverse KL(π_S‖q_β), q_β ∝ π̂_T·sg[π_S]^β, β from veto_beta to 0",
     "veto_beta, veto_divergence, veto_schedule", "as opd"),
)


def methods_help() -> str:
    """The method table as plain text for `--help`."""
    lines = ["methods (method.name; π̂_T is the teacher's top-k completed in the student's shape):"]
    for name, *fields in METHODS:
        for i, (label, text) in enumerate(zip(("behavior", "loss", "knobs", "teacher calls"), fields, strict=True)):
            first = f"  {name:<16}" if i == 0 else " " * 18
            lines.append(textwrap.fill(f"{label}: {text}", 100, initial_indent=first, subsequent_indent=" " * 20))
    return "\n".join(lines + ["", "Full descriptions and sources: docs/methods.md."])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="trb-train", description="On-policy distillation with TRB.",
                                     epilog=methods_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
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
