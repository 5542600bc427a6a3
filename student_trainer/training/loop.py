"""The training loop: roll out under the behavior policy, fetch teacher targets, minimise reverse KL.

    for step k:
        behavior, ε_k = plan.behavior_plan(k)               # TRB anneals ε to 0 over K steps
        batch   = rollouts of the student under μ at ε_k    # rollouts/batch.py
        targets = teacher top-k at every response prefix   # kept from the rollout (rollouts/targets.py)
        loss    = token-mean of plan.loss_plan(k)           # reverse KL(π_S || π̂_T) but for Veto and SFT warmup
        AdamW step                                          # training/learner.py

Read top to bottom: `train` starts the ranks, `_setup` loads the student and reaches the teacher,
`_loop` is the loop above with eval, logging and checkpoints around it.

Under torchrun each rank rolls out its slice of the global batch (distributed.py); row i of step k
samples from its own (seed, k, i) stream, so any world size gives the run one process would.
With train.max_staleness = s > 0, batch k is rolled out by the policy of step k - s while the
learner updates (rollouts/pipeline.py; train.producer: a task or a process, docs/async.md); it still
uses step k's ε, behavior and loss.
"""

from __future__ import annotations

import asyncio
import functools
import time
from contextlib import AsyncExitStack, nullcontext
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from student_trainer import startup
from student_trainer.config import DEFAULT_TEACHER, Config
from student_trainer.reports import trackers
from student_trainer.reports.run_log import NullLog, RunLog, quiet_transformers
from student_trainer.rollouts.batch import rollout_batch
from student_trainer.rollouts.pipeline import Pipeline, producer_copy, producer_device
from student_trainer.rollouts.producer_process import ProducerProcess, ProducerSpec
from student_trainer.training import checkpoint, distributed
from student_trainer.training.distributed import Dist
from student_trainer.training.evaluation import evaluator
from student_trainer.training.learner import learn, train_step
from student_trainer.training.run import Run, TrainingError, assemble, check_batch_split, restore, save

__all__ = ["TrainingError", "train", "train_sync"]


def train_sync(cfg: Config, resume: bool = False) -> dict[str, Any]:
    """`trb-train`: run (or resume) a distillation run; returns the end-of-run summary."""
    quiet_transformers()
    return asyncio.run(train(cfg, resume))


async def train(cfg: Config, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) a distillation run, on every rank under torchrun; returns the end-of-run summary."""
    d = distributed.init(cfg.student.device)
    try:
        return await _setup(cfg, resume, d)
    finally:
        distributed.shutdown(d)


async def _setup(cfg: Config, resume: bool, d: Dist) -> dict[str, Any]:
    """Check, load the student (or the latest checkpoint), reach the teacher (a local one if teacher.url
    is null), assemble the run, then `_loop`."""
    check_batch_split(cfg, d.world)
    producer_device(cfg.student.rollout_device, d.device, d.launched)  # a missing device fails before loading
    startup.check_sources(cfg, student=not resume)
    out = Path(cfg.train.out_dir)
    if d.main:
        startup.grader_note(cfg)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.public(), sort_keys=False))
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    ckpt = checkpoint.latest(out / "checkpoints") if resume else None
    if resume and ckpt is None:
        raise TrainingError(f"--resume: no checkpoint under {out / 'checkpoints'}")
    source = str(ckpt) if ckpt else cfg.student.path
    student = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, cfg.student.dtype)).to(d.device)
    tokenizer = AutoTokenizer.from_pretrained(source)

    def log_of(tid: str) -> Path:
        return out / ("teacher.log" if tid == DEFAULT_TEACHER else f"teacher-{tid}.log")

    # the teachers the trainer serves itself: started by the main rank, one each, shared by every rank
    with (startup.serving_local_teachers(cfg, log_of) if d.main else nullcontext({})) as local:
        urls = startup.teacher_urls(cfg, distributed.broadcast(d, local))
        async with AsyncExitStack() as stack:
            teachers = await startup.open_teachers(stack, cfg, urls, f"trainer:{out.name}", tokenizer,
                                                   report=startup.say if d.main else startup.quiet)
            run = assemble(cfg, student, tokenizer, teachers[DEFAULT_TEACHER], out, d, teachers)
            if ckpt:
                restore(run, ckpt)
            return await _loop(run)


async def _loop(run: Run) -> dict[str, Any]:
    """Steps until train.steps: rollouts and update (inline, or pipelined when max_staleness > 0), eval
    every train.eval_every steps, a checkpoint every train.save_every and at the end."""
    cfg = run.cfg
    log = _run_log(run) if run.dist.main else NullLog()
    evaluate = await evaluator(run)
    # before the first eval, so a producer process starts up meanwhile
    pipe = _start_producer(run) if cfg.train.max_staleness else None
    try:
        first = evaluate() if run.step == 0 else None
        if first:
            log.log(first)
        started, bad = time.perf_counter(), 0
        while run.step < cfg.train.steps:
            record = await (pipe.train(run.step, functools.partial(learn, run)) if pipe else train_step(run))
            bad = bad + 1 if record["skipped"] else 0
            if bad:
                log.note(f"[yellow]step {record['step']}: non-finite loss or gradient; update skipped")
            if bad >= cfg.train.max_bad_steps:
                raise TrainingError(f"{bad} consecutive non-finite steps (loss={record['loss']}, "
                                    f"grad_norm={record['grad_norm']}); lower optim.lr or check the teacher")
            run.step += 1
            if cfg.train.eval_every and run.step % cfg.train.eval_every == 0 and run.step < cfg.train.steps:
                record.update(evaluate())
            log.log(record)
            log.advance(record)
            if cfg.train.save_every and run.step % cfg.train.save_every == 0:
                save(run, await pipe.in_flight(run.step) if pipe else None)
        last = evaluate()
        log.log({**last, "final": True})
        save(run)
        distributed.barrier(run.dist)  # every rank returns once the last checkpoint is on disk
    except BaseException:
        log.close()
        raise
    finally:
        if pipe is not None:
            await pipe.close()
    summary = {"steps": run.step, "final_accuracy": last.get("eval_accuracy"), "final_probe_kl": last.get("probe_kl"),
               "wall_s": round(time.perf_counter() - started, 1), "out_dir": str(run.out)}
    if first:
        summary = {"initial_accuracy": first["eval_accuracy"], "initial_probe_kl": first["probe_kl"], **summary}
    log.close(summary)
    return summary


def _start_producer(run: Run) -> Pipeline:
    """The run's producer (train.max_staleness >= 1): a task of this process or a process of its
    own (`train.producer`), its copy of the policy on `student.rollout_device`."""
    cfg, d = run.cfg, run.dist
    device = producer_device(cfg.student.rollout_device, d.device, d.launched)
    common = (run.policy, run.step, cfg.train.steps, cfg.train.max_staleness, run.in_flight)
    if cfg.train.producer == "thread":
        policy = producer_copy(run.policy, device)
        return Pipeline(functools.partial(rollout_batch, run), *common, policy=policy).start()
    policy = producer_copy(run.policy, device, shared=True)
    remote = ProducerProcess(ProducerSpec.of(run, device), policy)
    return Pipeline(remote.produce, *common, policy=policy, on_close=remote.close).start()


def _run_log(run: Run) -> RunLog:
    t = run.cfg.train
    tracked = trackers.open_trackers(trackers.resolve(t.report_to), run.out, run.cfg.public(), run.out.name,
                                     t.tracker_project, resume=run.step > 0)
    return RunLog(run.out, t.steps, run.step, progress=t.progress, trackers=tracked)
