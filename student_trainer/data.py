"""Prompts for training, held-out problems for eval, and a fixed probe set, from the task generator.

Training prompts are a pure function of (seed, step), so a resumed run sees exactly the prompts an
uninterrupted one would have seen, with no data-loader state to save.
"""

from __future__ import annotations

from dataclasses import dataclass

from student_trainer.config import DataCfg
from student_trainer.tasks import arithmetic
from student_trainer.tasks.arithmetic import Problem


@dataclass
class TaskData:
    cfg: DataCfg

    def train_batch(self, step: int, size: int) -> list[Problem]:
        return arithmetic.generate(size, seed=self.cfg.seed * 1_000_003 + step, split="train", **self.cfg.difficulty)

    def eval_set(self) -> list[Problem]:
        return arithmetic.generate(self.cfg.eval_size, seed=self.cfg.seed, split="test", **self.cfg.difficulty)

    def probe_set(self) -> list[Problem]:
        """Reference prompts+solutions on which KL(π_S || π_T) is tracked over training."""
        return arithmetic.generate(self.cfg.probe_size, seed=self.cfg.seed + 7, split="test", **self.cfg.difficulty)

    @staticmethod
    def verify(completion: str, problem: Problem) -> bool:
        return arithmetic.verify(completion, problem)
