"""Where one OPD `train_step` and one TRL `DistillationTrainer` step spend their time, part by part.

    .venv/bin/python -m bench.profile_step [--steps 8]

Same setup as `bench_step_vs_trl` (32 prompts x 96 tokens, tiny models). Timers are patched around
the functions each step calls (wall and CPU seconds of this process; for the OPD `/v1/score` call
also the CPU of the teacher server and its model process), so parts nest: a line's time includes the
lines indented under it. No library code changes; the patches are undone on exit. Not a benchmark
with targets: it says which part a speed-up would have to shrink (docs/performance.md, finding 5).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch

from bench.bench_step_vs_trl import _prompts, _step_clock, opd_block, opd_run, trl_trainer
from bench.common import (
    base_parser,
    limit_threads,
    load_model,
    process_cpu_seconds,
    process_tree,
    run_sync,
    teacher_server,
    tiny_model,
)


class Clocks:
    """Wall and CPU seconds and call counts per named part."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.order: list[str] = []  # table rows in the order the parts were declared

    def declare(self, *names: str) -> None:
        self.order += [n for n in names if n not in self.order]

    def add(self, name: str, wall: float, cpu: float) -> None:
        self.wall[name] += wall
        self.cpu[name] += cpu
        self.calls[name] += 1

    def wrap(self, name: str | Callable[[], str], fn: Callable) -> Callable:
        """`fn` timed under `name` (a callable name is evaluated at call time)."""
        self.declare(*getattr(name, "names", [name]))
        key = name if callable(name) else (lambda: name)
        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def timed_async(*args: Any, **kwargs: Any) -> Any:
                wall, cpu = time.perf_counter(), time.process_time()
                try:
                    return await fn(*args, **kwargs)
                finally:
                    self.add(key(), time.perf_counter() - wall, time.process_time() - cpu)
            return timed_async

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(key(), time.perf_counter() - wall, time.process_time() - cpu)
        return timed

    def table(self, title: str, steps: int, step_wall: float, step_cpu: float) -> str:
        lines = [f"### {title}", "", f"{steps} steps; per step: {step_wall / steps * 1e3:.0f} ms wall, "
                 f"{step_cpu / steps * 1e3:.0f} ms CPU", "",
                 "| part | wall ms/step | share | CPU ms/step | share | calls/step |",
                 "| --- | --- | --- | --- | --- | --- |"]
        for name in self.order + [n for n in self.wall if n not in self.order]:
            lines.append(f"| {name} | {self.wall[name] / steps * 1e3:.1f} | {self.wall[name] / step_wall:.1%} | "
                         f"{self.cpu[name] / steps * 1e3:.1f} | {self.cpu[name] / step_cpu:.1%} | "
                         f"{self.calls[name] / steps:.0f} |")
        return "\n".join(lines) + "\n"


_MISSING = object()
SCORE = "    TeacherClient.score (wall: HTTP + server)"
SERVER_CPU = "      teacher server + model process (CPU only)"


@contextlib.contextmanager
def patched(clocks: Clocks, targets: list[tuple[object, str, str | Callable[[], str]]]) -> Iterator[None]:
    """Wrap `owner.attr` in a timer for each (owner, attr, name); restore them all on exit."""
    own = [vars(owner).get(attr, _MISSING) for owner, attr, _ in targets]  # inherited ones are deleted again
    try:
        for owner, attr, name in targets:
            setattr(owner, attr, clocks.wrap(name, getattr(owner, attr)))
        yield
    finally:
        for (owner, attr, _), original in zip(reversed(targets), reversed(own), strict=True):
            if original is _MISSING:
                delattr(owner, attr)
            else:
                setattr(owner, attr, original)


def _by_grad(when_grad: str, without: str) -> Callable[[], str]:
    """A part name chosen at call time: the same forward serves decoding (no grad) and the loss."""
    def name() -> str:
        return when_grad if torch.is_grad_enabled() else without
    name.names = [without]  # type: ignore[attr-defined]  # the grad one is placed by the caller
    return name


def profile_opd(steps: int, batch: int, max_new: int) -> str:
    import decoders.kv_decode as kv
    import decoders.static_decode as static
    import student_trainer.methods.behaviors as behaviors
    import student_trainer.rollouts.batch as batch_mod
    import student_trainer.rollouts.generate as rollout
    import student_trainer.rollouts.targets as targets
    import student_trainer.training.learner as learner
    import student_trainer.training.student_model as student_model
    from student_trainer.methods.row_generators import RowGenerators
    from student_trainer.teacher.client import TeacherClient

    student, teacher = tiny_model("student")[0], tiny_model("teacher")[0]
    clocks = Clocks()
    with teacher_server(teacher, 1) as server, asyncio.Runner() as loop:
        client = TeacherClient(server.url)
        run = opd_run(student, client, server.url, batch, max_new, 1)
        opd_block(run, loop, 2, server.proc.pid)  # warm-up, not timed
        pids = process_tree(server.proc.pid)
        score = TeacherClient.score

        async def score_with_server_cpu(*args: Any, **kwargs: Any) -> Any:
            before = sum(process_cpu_seconds(p) for p in pids)
            try:
                return await score(*args, **kwargs)
            finally:
                clocks.add(SERVER_CPU, 0.0,
                           sum(process_cpu_seconds(p) for p in pids) - before)

        TeacherClient.score = score_with_server_cpu
        targets = [
            (batch_mod, "_rollout", "rollout"),
            (batch_mod, "generate", "  decode loop (rollout.generate)"),
            (kv.KVDecoder, "prefill", "    prefill"),
            (kv.KVDecoder, "extend", "    KVDecoder.extend (incl. prefill)"),
            (static.StaticKVDecoder, "prefill", "    prefill"),  # and the Qwen3 decoder built on it
            (static.StaticKVDecoder, "extend", "    static / qwen3 decoder extend (incl. prefill)"),
            (run.lm, "forward", "      student forward (decode: transformers)"),
            (run.lm.base_model, "forward", _by_grad("  student body forward (loss)", "        body")),
            (rollout, "rows_of", "    rows_of"),
            (behaviors.OnPolicy, "sample", "    behavior.sample"),
            (behaviors, "_student_logp", "      log-softmax"),
            (behaviors, "sample_categorical", "      sample_categorical"),
            (RowGenerators, "rand", "        RowGenerators.rand"),
            (behaviors, "_diagnostics", "      _diagnostics"),
            (targets.TargetStream, "flush", "    streamed targets: collect a chunk, send the next"),
            (targets.TargetStream, "finish", "    streamed targets: the last chunk (waited for)"),
            (batch_mod, "score_targets", "  score_targets (teacher.stream_chunk_tokens 0, or a refused stream)"),
            (TeacherClient, "score", SCORE),
            (student_model.StudentLoss, "forward", "forward + loss"),
            (student_model, "chunked_loss_sum", "  chunked lm_head + loss"),
            (torch.Tensor, "backward", "backward"),
            (learner.distributed, "clip_grad_norm", "clip_grad_norm"),
            (run.optimizer, "step", "optimizer.step"),
            (learner, "summarize", "summarize diagnostics"),
        ]
        try:
            with patched(clocks, targets):
                clocks.order.insert(clocks.order.index(SCORE) + 1, SERVER_CPU)
                clocks.order.insert(clocks.order.index("forward + loss") + 1, "  student body forward (loss)")
                times = opd_block(run, loop, steps, server.proc.pid)
        finally:
            TeacherClient.score = score
        run_sync(loop, client.aclose())
    return clocks.table("OPD train_step", steps, sum(times.wall), sum(times.cpu))


def profile_trl(steps: int, batch: int, max_new: int) -> str:
    import trl.trainer.distillation_trainer as dt

    student, teacher = tiny_model("student")[0], tiny_model("teacher")[0]
    clocks, clock = Clocks(), _step_clock()
    cls = dt.DistillationTrainer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl_trainer(student, load_model(teacher), _prompts(batch * (steps + 1)), batch, max_new,
                              steps + 1, clock)
        targets = [
            (cls, "_generate_and_score_completions", "generate and prepare (_generate_and_score_completions)"),
            (cls, "_generate_single_turn", "  model.generate (_generate_single_turn)"),
            (trainer.model, "forward", "    student forward (decode)"),
            (cls, "compute_loss", "compute_loss"),
            (cls, "_get_last_hidden_state", _by_grad("  student backbone forward", "  teacher backbone forward")),
            (dt, "_chunked_divergence_loss", "  chunked divergence loss"),
            (torch.Tensor, "backward", "backward"),
            (torch.nn.utils, "clip_grad_norm_", "clip_grad_norm_"),
            (torch.optim.AdamW, "step", "AdamW.step"),
        ]
        with patched(clocks, targets):
            clocks.order.insert(clocks.order.index("compute_loss") + 1, "  student backbone forward")
            trainer.train()
    # The first step is the warm-up; the part timers include it, so they are averaged over all steps.
    n = len(clock.times.wall)
    return clocks.table("TRL DistillationTrainer step (first step included)", n, sum(clock.times.wall),
                        sum(clock.times.cpu))


def main() -> None:
    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    limit_threads(1)
    print(profile_opd(args.steps, 32, 96))
    print(profile_trl(args.steps, 32, 96))


if __name__ == "__main__":
    main()
