"""Prompts for training, held-out problems for eval, and a fixed probe set, for the configured task.

Training prompts are a pure function of (seed, step), so a resumed run sees exactly the prompts an
uninterrupted one would have seen, with no data-loader state to save. `data.task` picks the source:

- arithmetic: generated on the fly (disjoint train/test splits by construction);
- math: problem files (student_trainer/tasks/math_data.py), prompts in the student's chat format,
  graded by the last \\boxed{} answer (student_trainer/tasks/math.py).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from student_trainer.config import DataCfg
from student_trainer.tasks import arithmetic, math_data, math_grader
from student_trainer.tasks.arithmetic import Problem


@dataclass
class TaskData:
    """The task's problems; `tokenizer` (the student's) is needed by tasks with chat prompts (math)."""

    cfg: DataCfg
    tokenizer: Any = None
    _math: MathProblems | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.cfg.task == "math":
            self._math = load_math(self.cfg, self.tokenizer)

    def train_batch(self, step: int, size: int) -> list[Problem]:
        if self._math:
            return self._math.train_batch(step, size)
        return arithmetic.generate(size, seed=self.cfg.seed * 1_000_003 + step, split="train", **self.cfg.difficulty)

    @property
    def _eval_seed(self) -> int:
        return self.cfg.seed if self.cfg.eval_seed is None else self.cfg.eval_seed

    def eval_set(self) -> list[Problem]:
        if self._math:
            return self._math.eval[: self.cfg.eval_size]
        return arithmetic.generate(self.cfg.eval_size, seed=self._eval_seed, split="test", **self.cfg.difficulty)

    def probe_set(self) -> list[Problem]:
        """Reference prompts+solutions on which KL(π_S || π_T) is tracked over training."""
        if self._math:
            return self._math.eval[: self.cfg.probe_size]
        return arithmetic.generate(self.cfg.probe_size, seed=self._eval_seed + 7, split="test", **self.cfg.difficulty)

    @property
    def verify(self) -> Callable[[str, Problem], bool]:
        """The task's grader: (completion text, problem) -> correct."""
        return functools.partial(math_grader.verify, grader=self.cfg.grader) if self.cfg.task == "math" \
            else arithmetic.verify


@dataclass
class MathProblems:
    """Rendered math problems: a training pool visited in a per-epoch shuffled order, and an eval list."""

    train: list[Problem]
    eval: list[Problem]
    seed: int

    def train_batch(self, step: int, size: int) -> list[Problem]:
        """Problems step*size .. (step+1)*size - 1 of the endless sequence of shuffled epochs."""
        n = len(self.train)
        picks = range(step * size, (step + 1) * size)
        return [self.train[_permutation(n, self.seed, i // n)[i % n]] for i in picks]


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    return tuple(random.Random(f"{seed}/{epoch}").sample(range(n), n))


def load_math(cfg: DataCfg, tokenizer: Any) -> MathProblems:
    """Read cfg.path (and cfg.eval_path), render prompts with the student's tokenizer.

    Without eval_path, eval_size problems of cfg.path (a seeded random choice) are held out of
    training. With it, the first eval_size problems of that file are the eval set, and any training
    problem whose question also appears in the eval file is dropped from training.
    """
    if tokenizer is None:
        raise ValueError("data.task=math needs the student's tokenizer to build prompts")
    pool = math_data.load_records(cfg.path)
    if cfg.eval_path is not None:
        held_out = math_data.load_records(cfg.eval_path)
        seen = {r.question for r in held_out}
        train, held_out = [r for r in pool if r.question not in seen], held_out[: cfg.eval_size]
    else:
        eval_seed = cfg.seed if cfg.eval_seed is None else cfg.eval_seed
        order = random.Random(f"{eval_seed}/holdout").sample(range(len(pool)), len(pool))
        held_out = [pool[i] for i in order[: cfg.eval_size]]
        train = [pool[i] for i in sorted(order[cfg.eval_size :])]
    if not train:
        raise math_data.DataError(f"{cfg.path}: no training problems left after holding out eval problems "
                                  f"({len(pool)} in the file, data.eval_size={cfg.eval_size})")

    def render(r: math_data.MathRecord) -> Problem:
        prompt = math_data.format_prompt(r.question, tokenizer, cfg.instruction, cfg.chat_template_kwargs)
        return Problem(prompt=prompt, solution=r.solution, answer=r.answer)

    return MathProblems([render(r) for r in train], [render(r) for r in held_out], cfg.seed)
