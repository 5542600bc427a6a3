"""One optimizer step's rollouts on this rank: the rows, their behavior and ε, their teacher targets.

Row i of step k samples from its own (seed, k, i) stream, so any world size, `rollout_batch_size`
split or producer (inline, a thread, a process: pipeline.py) rolls out the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from student_trainer.config import Config
from student_trainer.data import TaskData
from student_trainer.methods import plan
from student_trainer.methods.behaviors import Behavior, make_behavior
from student_trainer.methods.row_generators import RowGenerators
from student_trainer.rollouts.generate import generate
from student_trainer.rollouts.offline_data import OfflineData
from student_trainer.rollouts.rollout import Rollout
from student_trainer.rollouts.targets import score_targets
from student_trainer.teacher.client import TeacherClient
from student_trainer.training.distributed import Dist


class RolloutSource(Protocol):
    """What rolling out needs: the trainer's Run has it, and so does a producer process's stand-in."""

    cfg: Config
    tokenizer: Any
    teachers: dict[str, TeacherClient]  # by id: a row is rolled out with the teacher that `teacher.route` names
    data: TaskData
    dist: Dist
    offline: OfflineData | None


async def rollout_batch(source: RolloutSource, step: int, policy: torch.nn.Module) -> list[Rollout]:
    """This rank's rows of step `step`'s batch, rolled out by `policy` under that step's behavior and ε
    (also when a stale policy samples it ahead of time: pipeline.py), `rollout_batch_size` at a time
    (one decode loop and teacher session each). Rows sample from their own streams, so the split
    changes no token."""
    cfg = source.cfg
    rows = source.dist.rows(cfg.train.batch_size)
    per_rollout = cfg.train.rollout_batch_size or len(rows)
    if source.offline is not None:  # offline_kd: stored completions with their stored teacher targets
        return source.offline.rollouts(step, cfg.train.batch_size, rows, per_rollout)
    name, eps = plan.behavior_plan(cfg, step)
    behavior = make_behavior(name, k_skd=cfg.method.skd_top_k) if name == "skd" else make_behavior(name)
    problems = source.data.train_batch(step, cfg.train.batch_size)[rows.start : rows.stop]
    rollouts = []
    for i in range(0, len(rows), per_rollout):
        for teacher, part in _by_teacher(cfg, problems[i : i + per_rollout], rows[i : i + per_rollout]):
            rollouts.append(await _rollout(source, [problems[r - rows.start] for r in part], part, behavior, eps,
                                           step, policy, source.teachers[teacher]))
    return rollouts


def _by_teacher(cfg: Config, problems: list, rows: range) -> list[tuple[str, list[int]]]:
    """The rows split by the teacher that scores them (teacher.route), in order of first appearance;
    one group, all of `rows`, with a single teacher."""
    groups: dict[str, list[int]] = {}
    for problem, row in zip(problems, rows, strict=True):
        groups.setdefault(cfg.teacher.teacher_of(problem.prompt), []).append(row)
    return list(groups.items())


async def _rollout(source: RolloutSource, problems: list, rows: Sequence[int], behavior: Behavior, eps: float,
                   step: int, policy: torch.nn.Module, teacher: TeacherClient) -> Rollout:
    """Rollouts of global batch rows `rows`, each row sampled from its own (seed, step, row) stream."""
    cfg, tok = source.cfg, source.tokenizer
    prompts = [tok(p.prompt, add_special_tokens=False)["input_ids"] for p in problems]
    generator = RowGenerators.seeded(cfg.train.seed, step, rows, next(policy.parameters()).device)
    policy.eval()
    rollout = await generate(policy, prompts, behavior, eps, teacher, cfg.teacher.top_k,
                             cfg.train.max_new_tokens, tok.eos_token_id, tok.pad_token_id, generator,
                             decoder=cfg.student.decoder, stream_chunk=cfg.teacher.stream_chunk_tokens)
    if rollout.targets is None:
        rollout.targets = await score_targets(rollout, teacher, cfg.teacher.top_k, tok.pad_token_id)
    return rollout
