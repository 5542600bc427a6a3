"""A run's state and its persistence: build it around a loaded student, save it, restore it.

Everything a resumed run needs is a function of (seed, step) or lives in the checkpoint: the
weights (float32 masters), AdamW's and the scheduler's state, the RNG, the config, and under
train.max_staleness > 0 the batches in flight (sampled by older policy versions).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from student_trainer.config import DEFAULT_TEACHER, Config
from student_trainer.data import TaskData
from student_trainer.rollouts.offline_data import OfflineData
from student_trainer.rollouts.pipeline import Batch
from student_trainer.teacher.client import TeacherClient
from student_trainer.training import checkpoint, distributed
from student_trainer.training.distributed import Dist
from student_trainer.training.student_model import StudentLoss, compute_dtype, make_policy


class TrainingError(RuntimeError):
    pass


@dataclass
class Run:
    cfg: Config
    out: Path
    student: torch.nn.Module  # what the optimizer trains: StudentLoss, under DDP / FSDP when launched
    tokenizer: Any
    teacher: TeacherClient
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    data: TaskData
    step: int = 0
    lm: torch.nn.Module | None = None  # the master CausalLM inside `student` (default: student.lm)
    policy: torch.nn.Module | None = None  # the CausalLM rollouts and eval use (default: lm)
    dist: Dist = field(default_factory=Dist)
    in_flight: dict[int, Batch] = field(default_factory=dict)  # restored from a checkpoint (pipeline.py)
    offline: OfflineData | None = None  # offline_kd's stored batches
    teachers: dict[str, TeacherClient] = field(default_factory=dict)  # by id (teacher.others); `teacher` is default

    def __post_init__(self) -> None:
        self.teachers = {DEFAULT_TEACHER: self.teacher, **self.teachers}
        inner = getattr(self.student, "module", self.student)  # DDP keeps the module as .module
        if not isinstance(inner, StudentLoss):  # a bare CausalLM (tests, benches): train it as train() would
            self.student = inner = StudentLoss(self.student, self.cfg.train.loss_chunk_tokens)
        if self.lm is None:
            self.lm = inner.lm
        if self.policy is None:
            self.policy = self.lm


def lr_lambda(cfg: Config) -> Callable[[int], float]:
    """The learning-rate factor at a step: linear warmup, then constant or cosine to 0."""
    o, total = cfg.optim, cfg.train.steps

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - o.warmup_steps) / max(1, total - o.warmup_steps)))
        return 1.0

    return factor


def check_batch_split(cfg: Config, world: int) -> None:
    """Fail before loading anything when the global batch does not split over ranks and micro-batches."""
    t = cfg.train
    if t.batch_size % (world * cfg.optim.accum_steps):
        raise TrainingError(f"train.batch_size={t.batch_size} is the global batch: it must divide by "
                            f"world size x optim.accum_steps = {world} x {cfg.optim.accum_steps}")
    per_rank = t.batch_size // world
    micro = per_rank // cfg.optim.accum_steps
    if t.rollout_batch_size and (per_rank % t.rollout_batch_size or t.rollout_batch_size % micro):
        raise TrainingError(f"train.rollout_batch_size={t.rollout_batch_size} must divide this rank's {per_rank} rows "
                            f"and be a multiple of the {micro}-row backward micro-batch (batch_size / world / "
                            f"accum_steps)")


def assemble(cfg: Config, student: torch.nn.Module, tokenizer: Any, client: TeacherClient, out: Path,
             d: Dist | None = None, teachers: dict[str, TeacherClient] | None = None) -> Run:
    """A Run around a loaded float32 (or bf16) CausalLM: rollout copy, loss module, DDP / FSDP, AdamW."""
    d = d or Dist()
    fsdp = d.launched and cfg.train.parallel == "fsdp"
    mixed = compute_dtype(cfg.train.precision)
    policy = make_policy(student, cfg.train.precision, separate=fsdp)  # before sharding
    loss = StudentLoss(student, cfg.train.loss_chunk_tokens, autocast_dtype=None if fsdp else mixed)
    model = distributed.wrap(loss, d, cfg.train.parallel, param_dtype=mixed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas,
                                  weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    offline = OfflineData.open(cfg.data.offline_path, tokenizer.pad_token_id, cfg.data.seed) \
        if cfg.method.name == "offline_kd" else None
    return Run(cfg, out, model, tokenizer, client, optimizer, scheduler, TaskData(cfg.data, tokenizer),
               lm=student, policy=policy, dist=d, offline=offline, teachers=teachers or {})


def restore(run: Run, ckpt: Path) -> None:
    """Continue from a checkpoint that `save` wrote (its weights are already loaded into `run.lm`)."""
    state = checkpoint.load_state(ckpt)
    distributed.load_optimizer_state(run.student, run.optimizer, state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    checkpoint.set_rng_state(state["rng"])
    run.step = state["step"]
    distributed.refresh_policy(run.student, run.lm, run.policy)
    in_flight = state.get("in_flight") or []
    run.in_flight = in_flight[run.dist.rank] if len(in_flight) == run.dist.world else {}


def save(run: Run, in_flight: dict[int, Batch] | None = None) -> None:
    """Rank 0 writes the checkpoint; every rank calls this (FSDP gathers the optimizer state).

    The weights saved are the float32 masters: the unsharded `lm` when there is one, else (FSDP)
    the gathered state, written through the plain copy's `save_pretrained`. Under
    max_staleness > 0 it also holds every rank's batches in flight (sampled by older versions).
    """
    batches = distributed.gather(run.dist, in_flight or {})
    optimizer = distributed.optimizer_state(run.student, run.optimizer, run.dist)
    fsdp = run.dist.launched and run.cfg.train.parallel == "fsdp"
    weights = distributed.full_state_dict(run.student) if fsdp and run.policy.dtype != torch.float32 else None
    if run.dist.main:
        state = {"step": run.step, "optimizer": optimizer, "scheduler": run.scheduler.state_dict(),
                 "rng": checkpoint.rng_state(), "config": run.cfg.public(),
                 "in_flight": batches}
        checkpoint.save(run.out / "checkpoints", run.step, run.policy if fsdp else run.lm, run.tokenizer,
                        state, run.cfg.train.keep_checkpoints, state_dict=weights)
