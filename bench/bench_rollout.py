"""Target 4: a TRB-blended rollout vs the student and the teacher decoding the same tokens alone.

    .venv/bin/python -m bench.bench_rollout

Per round, interleaved:
  - TRB rollout as shipped (`student_trainer.rollouts.rollout.generate`, Blend at ε > 0, teacher session over
    HTTP; each step's extend is sent first and the student's forward runs while the server computes);
  - the same rollout with that overlap removed (`overlap=False`: the extend is awaited, then the
    student's forward runs);
  - student alone: the student's decode of exactly the tokens the TRB rollout produced, with the
    decoder the rollout picks (`make_decoder`: the hand-written Qwen3 step on a CPU) and an on-policy
    sampling call per step (what a student-only rollout of those tokens costs);
  - teacher alone: a session over HTTP fed exactly those tokens (open, one extend per step, close).

Targets: TRB <= 1.3 x (student alone + teacher alone); the β solver <= 5% of the rollout.
CPU seconds (this process + the server) are reported next to wall time: the machine is shared,
and an overlap can only shorten wall time when a core is idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import (
    Section,
    Times,
    base_parser,
    interleave,
    large_teacher,
    limit_threads,
    load_model,
    machine_info,
    median,
    report,
    run_sync,
    spread,
    teacher_server,
    tiny_model,
)
from decoders.choose import make_decoder
from student_trainer.methods import behaviors
from student_trainer.methods.behaviors import Blend, OnPolicy
from student_trainer.rollouts.generate import generate
from student_trainer.rollouts.rollout import Rollout
from student_trainer.tasks import arithmetic
from student_trainer.tasks.tokenizer import build_tokenizer
from student_trainer.teacher.client import TeacherClient

TOP_K, EPS = 20, 0.1


@dataclass
class Setup:
    """Everything one regime needs: models, prompts, the server's client, the event loop."""

    student: torch.nn.Module
    prompts: list[list[int]]
    client: TeacherClient
    loop: asyncio.Runner
    max_new_tokens: int
    eos: int
    pad: int


def task_prompts(batch: int, seed: int = 0) -> list[list[int]]:
    """Token ids of `batch` arithmetic training prompts (what the recipe trains on)."""
    tok = build_tokenizer()
    return [tok(p.prompt, add_special_tokens=False)["input_ids"]
            for p in arithmetic.generate(batch, seed=seed, split="train")]


class SolverClock:
    """Wraps `behaviors.solve_beta` to add up the seconds spent in it (one clock read per step)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._inner = behaviors.solve_beta

    def __call__(self, *args: object, **kwargs: object) -> torch.Tensor:
        started = time.perf_counter()
        try:
            return self._inner(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - started

    @contextlib.contextmanager
    def installed(self) -> Iterator[SolverClock]:
        behaviors.solve_beta = self
        try:
            yield self
        finally:
            behaviors.solve_beta = self._inner


def trb_rollout(s: Setup, seed: int = 0, overlap: bool = True) -> Rollout:
    """The rollout under test (same seed every call, so every call draws the same tokens)."""
    return run_sync(s.loop, generate(s.student, s.prompts, Blend(), EPS, s.client, TOP_K, s.max_new_tokens, s.eos,
                               s.pad, torch.Generator().manual_seed(seed), overlap=overlap))


def replay_steps(r: Rollout) -> list[tuple[list[int], list[list[int]]]]:
    """The (rows, tokens) of every extend `generate` made: rows still running after step t get token t."""
    p, lens = r.prompt_width, r.response_lens_B.tolist()
    out = []
    for t in range(max(lens) - 1):
        rows = [b for b, n in enumerate(lens) if n >= t + 2]
        out.append((rows, [[int(r.tokens_B_T[b, p + t])] for b in rows]))
    return out


def student_alone(s: Setup, steps: list[tuple[list[int], list[list[int]]]]) -> None:
    """The student's decode of the given tokens, with an on-policy sampling call per step."""
    decoder = make_decoder(s.student, s.pad, capacity=max(map(len, s.prompts)) + s.max_new_tokens)
    behavior, gen = OnPolicy(), torch.Generator().manual_seed(0)
    logits = decoder.prefill(s.prompts)
    for rows, toks in steps:
        behavior.sample(logits, None, 0.0, gen)
        logits = decoder.extend(rows, toks)
    behavior.sample(logits, None, 0.0, gen)


async def _teacher_alone(s: Setup, steps: list[tuple[list[int], list[list[int]]]]) -> None:
    session = await s.client.open_session(s.prompts, TOP_K)
    for rows, toks in steps:
        await session.extend(toks, rows)
    await session.close()


def teacher_alone(s: Setup, steps: list[tuple[list[int], list[list[int]]]]) -> None:
    """The teacher session fed exactly the rollout's tokens, over HTTP."""
    s.loop.run(_teacher_alone(s, steps))


def measure(section: Section, label: str, teacher: Path, threads: int, batch: int, max_new: int,
            rounds: int) -> None:
    """All variants of one regime, interleaved; adds its rows to `section`."""
    tok = build_tokenizer()
    student = load_model(tiny_model("student")[0])
    with teacher_server(teacher, threads) as server, asyncio.Runner() as loop:
        s = Setup(student, task_prompts(batch), TeacherClient(server.url), loop, max_new, tok.eos_token_id,
                  tok.pad_token_id)
        reference = trb_rollout(s)
        steps = replay_steps(reference)
        clock = SolverClock()

        def trb() -> None:
            with clock.installed():
                trb_rollout(s)

        variants = {"trb": trb, "serial": lambda: trb_rollout(s, overlap=False),
                    "student": lambda: student_alone(s, steps), "teacher": lambda: teacher_alone(s, steps)}
        times = interleave(variants, rounds, pids=(server.proc.pid,))
        solver_per_rollout = clock.seconds / (rounds + 1)  # the warm-up round ran it too
        run_sync(loop, s.client.aclose())
    _rows(section, label, times, solver_per_rollout, reference)


def _rows(section: Section, label: str, times: dict[str, Times], solver_s: float, r: Rollout) -> None:
    wall = {name: median(t.wall) for name, t in times.items()}
    cpu = {name: median(t.cpu) for name, t in times.items()}
    alone, alone_cpu = wall["student"] + wall["teacher"], cpu["student"] + cpu["teacher"]
    n_tok = int(r.response_lens_B.sum())
    section.add(f"{label}: TRB rollout (as shipped)", f"{spread(times['trb'].wall)}; {n_tok} tokens; "
                f"{cpu['trb'] * 1e3:.0f} ms CPU")
    section.add(f"{label}: student alone, same tokens", f"{spread(times['student'].wall)}; "
                f"{cpu['student'] * 1e3:.0f} ms CPU")
    section.add(f"{label}: teacher alone (HTTP session), same tokens", f"{spread(times['teacher'].wall)}; "
                f"{cpu['teacher'] * 1e3:.0f} ms CPU (client + server)")
    section.add(f"{label}: TRB / (student alone + teacher alone)", f"sum {alone * 1e3:.0f} ms", wall["trb"] / alone,
                "<= 1.3")
    section.add(f"{label}: same, CPU seconds (client + server)", f"sum {alone_cpu * 1e3:.0f} ms CPU",
                cpu["trb"] / alone_cpu, "(<= 1.3)")
    section.add(f"{label}: β solver share of the TRB rollout", f"{solver_s * 1e3:.1f} ms per rollout",
                solver_s / wall["trb"], "<= 0.05")
    section.add(f"{label}: TRB without overlap (student step inline, then extend)",
                f"{spread(times['serial'].wall)}; {cpu['serial'] * 1e3:.0f} ms CPU")
    section.add(f"{label}: TRB with overlap (as shipped) / without", "", wall["trb"] / wall["serial"])


def run(threads: int = 1, quick: bool = False) -> Section:
    limit_threads(threads)
    _, student = tiny_model("student")
    _, teacher = tiny_model("teacher")
    section = Section("4. TRB rollout vs student alone + teacher alone",
                      f"Student: {student}. ε = {EPS}, top-{TOP_K}, arithmetic prompts. Tiny teacher: {teacher}; "
                      "larger teacher: random Qwen3 hidden 512 x 8 layers. Medians of "
                      f"{2 if quick else 5} interleaved rounds.")
    rounds = 2 if quick else 5
    measure(section, "tiny teacher, 32 rows x 96 new", tiny_model("teacher")[0], threads, 32, 96, rounds)
    measure(section, "larger teacher, 16 rows x 48 new", large_teacher(), threads, 16, 48, rounds)
    return section


def main() -> None:
    args = base_parser(__doc__.splitlines()[0]).parse_args()
    info = machine_info(args.threads)
    print(report([run(args.threads, args.quick)], info))


if __name__ == "__main__":
    main()
