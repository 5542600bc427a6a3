"""Step time of the trainer at train.max_staleness 0 (rollout, then update) vs 1 (the next batch is
rolled out while the learner updates), on the shipped tiny models and a real teacher server.

    .venv/bin/python -m bench.bench_async [--threads 1] [--rounds 3] [--steps 6]

Each round runs a short recipe-shaped run at each staleness (alternating, so load drifts hit both);
a run's first step (no overlap yet, warm-up) is dropped. Reported: median step wall time with
(min-max) over every kept step of every round, and at staleness 1 the median rollout time, update
time and learner idle time: overlap is real when the step time approaches max(rollout, update).
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from bench.common import base_parser, limit_threads, machine_info, machine_markdown, teacher_server, tiny_model
from student_trainer.config import load_config
from student_trainer.run_log import read_metrics
from student_trainer.train import train_sync


def _run(url: str, student: Path, out: Path, staleness: int, steps: int, threads: int, batch: int,
         new_tokens: int) -> list[dict]:
    cfg = load_config(None, [f"student.path={student}", f"teacher.url={url}", "teacher.top_k=20",
                             f"train.batch_size={batch}", f"train.max_new_tokens={new_tokens}",
                             "train.eval_every=0", "train.save_every=0", f"train.steps={steps}",
                             f"train.out_dir={out}", "train.progress=false", f"train.threads={threads}",
                             "data.eval_size=8", "data.probe_size=8", "method.name=trb", "method.eps0=0.1",
                             "method.horizon=100", "optim.lr=0.0005", f"train.max_staleness={staleness}"])
    train_sync(cfg)
    return [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r][1:]


def _fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3f} s ({min(xs):.3f}-{max(xs):.3f}, n={len(xs)})"


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=48)
    args = ap.parse_args()
    limit_threads(args.threads)
    info = machine_info(args.threads)
    teacher, _ = tiny_model("teacher")
    student, _ = tiny_model("student")
    kept: dict[int, list[dict]] = {0: [], 1: []}
    with teacher_server(teacher, args.threads) as server, tempfile.TemporaryDirectory() as tmp:
        for r in range(1 if args.quick else args.rounds):
            for s in (0, 1):
                kept[s] += _run(server.url, student, Path(tmp) / f"r{r}s{s}", s, args.steps, args.threads,
                                args.batch, args.new_tokens)
    print(machine_markdown(info))
    print(f"batch {args.batch}, max_new_tokens {args.new_tokens}, {args.steps} steps x "
          f"{1 if args.quick else args.rounds} rounds, first step of each run dropped\n")
    step0, step1 = [r["step_s"] for r in kept[0]], [r["step_s"] for r in kept[1]]
    print(f"- staleness 0: step {_fmt(step0)}")
    ratio = statistics.median(step1) / statistics.median(step0)
    print(f"- staleness 1: step {_fmt(step1)}; ratio of medians {ratio:.2f}")
    for key in ("rollout_s", "update_s", "learner_idle_s", "producer_idle_s"):
        print(f"  - {key}: {_fmt([r[key] for r in kept[1]])}")
    bound = [max(r["rollout_s"], r["update_s"]) for r in kept[1]]
    hidden = statistics.median(s / b for s, b in zip(step1, bound, strict=True))
    print(f"  - step / max(rollout, update), median: {hidden:.2f}")


if __name__ == "__main__":
    main()
