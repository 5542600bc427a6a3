"""Step time of the trainer at train.max_staleness 0 (rollout, then update) vs 1 (the next batch is
rolled out while the learner updates), on the shipped tiny models and a real teacher server.

    .venv/bin/python -m bench.bench_async [--threads 1] [--rounds 3] [--steps 6] [--producer both]

Each round runs a short recipe-shaped run at each setting (alternating, so load drifts hit all);
a run's first step (no overlap yet, warm-up; a producer process's start-up) is dropped. Settings:
staleness 0, and staleness 1 with each `--producer` (thread, process, or both: train.producer).
Reported: median step wall time with (min-max) over every kept step of every round, and at
staleness 1 the median rollout time, update time and learner idle time: overlap is real when the
step time approaches max(rollout, update). Also each run's whole wall time (start-up included).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from bench.common import base_parser, limit_threads, machine_info, machine_markdown, teacher_server, tiny_model
from student_trainer.config import load_config
from student_trainer.reports.metrics_file import read_metrics
from student_trainer.training.loop import train_sync


def _run(url: str, student: Path, out: Path, staleness: int, producer: str, steps: int, threads: int, batch: int,
         new_tokens: int) -> tuple[list[dict], float]:
    cfg = load_config(None, [f"student.path={student}", f"teacher.url={url}", "teacher.top_k=20",
                             f"train.batch_size={batch}", f"train.max_new_tokens={new_tokens}",
                             "train.eval_every=0", "train.save_every=0", f"train.steps={steps}",
                             f"train.out_dir={out}", "train.progress=false", f"train.threads={threads}",
                             "data.eval_size=8", "data.probe_size=8", "method.name=trb", "method.eps0=0.1",
                             "method.horizon=100", "optim.lr=0.0005", f"train.max_staleness={staleness}",
                             f"train.producer={producer}"])
    started = time.perf_counter()
    train_sync(cfg)
    return [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r][1:], time.perf_counter() - started


def _fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3f} s ({min(xs):.3f}-{max(xs):.3f}, n={len(xs)})"


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--producer", choices=["thread", "process", "both"], default="thread",
                    help="the staleness-1 producer(s) to run (train.producer)")
    args = ap.parse_args()
    limit_threads(args.threads)
    info = machine_info(args.threads)
    teacher, _ = tiny_model("teacher")
    student, _ = tiny_model("student")
    settings = [(0, "thread")] + [(1, p) for p in (["thread", "process"] if args.producer == "both" else
                                                   [args.producer])]
    kept: dict[tuple[int, str], list[dict]] = {s: [] for s in settings}
    walls: dict[tuple[int, str], list[float]] = {s: [] for s in settings}
    rounds = 1 if args.quick else args.rounds
    with teacher_server(teacher, args.threads) as server, tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for s, p in settings:
                records, wall = _run(server.url, student, Path(tmp) / f"r{r}s{s}{p}", s, p, args.steps,
                                     args.threads, args.batch, args.new_tokens)
                kept[(s, p)] += records
                walls[(s, p)].append(wall)
    print(machine_markdown(info))
    print(f"batch {args.batch}, max_new_tokens {args.new_tokens}, {args.steps} steps x {rounds} rounds, first step "
          f"of each run dropped\n")
    step0 = [r["step_s"] for r in kept[(0, "thread")]]
    print(f"- staleness 0: step {_fmt(step0)}; run wall {_fmt(walls[(0, 'thread')])}")
    for s, p in settings[1:]:
        step1 = [r["step_s"] for r in kept[(s, p)]]
        ratio = statistics.median(step1) / statistics.median(step0)
        print(f"- staleness 1, {p} producer: step {_fmt(step1)}; ratio of medians {ratio:.2f}; "
              f"run wall {_fmt(walls[(s, p)])}")
        for key in ("rollout_s", "update_s", "learner_idle_s", "producer_idle_s"):
            print(f"  - {key}: {_fmt([r[key] for r in kept[(s, p)]])}")
        bound = [max(r["rollout_s"], r["update_s"]) for r in kept[(s, p)]]
        hidden = statistics.median(x / b for x, b in zip(step1, bound, strict=True))
        print(f"  - step / max(rollout, update), median: {hidden:.2f}")


if __name__ == "__main__":
    main()
