"""The training loop: roll out under the behavior policy, fetch teacher targets, minimise reverse KL.

    for step k:
        ε_k   = budget(schedule, k)                        # TRB anneals it to 0 over K steps
        batch = rollouts of the student under μ (blend / SKD / teacher / student) at ε_k
        targets = teacher top-k at every response prefix   # kept from the rollout, or one score call
        loss  = mean over response tokens of KL(π_S || π̂_T); AdamW step

Everything a resumed run needs is a function of (seed, step) or lives in the checkpoint.
Under torchrun each rank rolls out its slice of the global batch (distributed.py); row i of step k
samples from its own (seed, k, i) stream, so any world size gives the run one process would.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from shared.kv_decode import position_ids
from student_trainer import checkpoint, distributed, startup
from student_trainer.behaviors import Behavior, make_behavior
from student_trainer.config import Config
from student_trainer.data import TaskData
from student_trainer.distributed import Dist
from student_trainer.evaluation import accuracy, build_probe, probe_kl
from student_trainer.losses import reverse_kl_loss
from student_trainer.rollout import Rollout, generate, score_targets, summarize
from student_trainer.row_generators import RowGenerators
from student_trainer.run_log import NullLog, RunLog
from student_trainer.schedules import budget
from student_trainer.teacher_client import TeacherClient


class TrainingError(RuntimeError):
    pass


def method_plan(cfg: Config, step: int) -> tuple[str, float]:
    """(behavior name, ε) at an optimizer step: the only place the methods differ."""
    m = cfg.method
    if m.name == "trb":
        return "trb", budget(m.schedule, step, m.eps0, m.horizon)
    if m.name == "fixed_eps":
        return "fixed_eps", m.eps0
    if m.name == "sft_warmup":
        return ("teacher", 0.0) if step < m.horizon else ("opd", 0.0)
    return m.name, 0.0


def _behavior(cfg: Config, name: str) -> Behavior:
    return make_behavior(name, k_skd=cfg.method.skd_top_k) if name == "skd" else make_behavior(name)


def lr_lambda(cfg: Config) -> Any:
    o, total = cfg.optim, cfg.train.steps

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - o.warmup_steps) / max(1, total - o.warmup_steps)))
        return 1.0

    return factor


@dataclass
class Run:
    cfg: Config
    out: Path
    student: torch.nn.Module
    tokenizer: Any
    teacher: TeacherClient
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    data: TaskData
    step: int = 0
    policy: torch.nn.Module | None = None  # plain module for rollouts, eval, checkpoints (default: student)
    dist: Dist = field(default_factory=Dist)

    def __post_init__(self) -> None:
        if self.policy is None:
            self.policy = self.student


async def _rollout(run: Run, problems: list, rows: range, behavior: Behavior, eps: float) -> Rollout:
    """Rollouts of global batch rows `rows`, each row sampled from its own (seed, step, row) stream."""
    cfg, tok = run.cfg, run.tokenizer
    prompts = [tok(p.prompt, add_special_tokens=False)["input_ids"] for p in problems]
    generator = RowGenerators.seeded(cfg.train.seed, run.step, rows, run.dist.device)
    run.policy.eval()
    rollout = await generate(run.policy, prompts, behavior, eps, run.teacher, cfg.teacher.top_k,
                             cfg.train.max_new_tokens, tok.eos_token_id, tok.pad_token_id, generator)
    if rollout.targets is None:
        rollout.targets = await score_targets(rollout, run.teacher, cfg.teacher.top_k, tok.pad_token_id)
    return rollout


def _micro_loss(run: Run, rollout: Rollout, n_tokens: float) -> torch.Tensor:
    device = run.dist.device
    mask_B_T = rollout.attention_mask_B_T.to(device)
    run.student.train()
    logits = run.student(input_ids=rollout.tokens_B_T.to(device), attention_mask=mask_B_T,
                         position_ids=position_ids(mask_B_T)).logits
    return reverse_kl_loss(logits, rollout.targets.to(device), rollout.loss_mask_B_T.to(device), n_tokens)[0]


async def train_step(run: Run) -> dict[str, Any]:
    """One optimizer step over the global batch; this rank's rows go in `accum_steps` micro-batches.

    The loss is Σ KL over every response token of the global batch / their number. DDP and FSDP
    average gradients over ranks, so each rank divides its sum by (global tokens / world): the
    average is then the gradient of that token-mean, whatever the world size or micro-batch split.
    Loss and gradient norm are global, so a non-finite step is skipped on every rank alike.
    """
    cfg, d, started = run.cfg, run.dist, time.perf_counter()
    name, eps = method_plan(cfg, run.step)
    behavior = _behavior(cfg, name)
    rows = d.rows(cfg.train.batch_size)
    problems = run.data.train_batch(run.step, cfg.train.batch_size)[rows.start : rows.stop]
    micro = len(rows) // cfg.optim.accum_steps
    rollouts = [await _rollout(run, problems[i : i + micro], rows[i : i + micro], behavior, eps)
                for i in range(0, len(rows), micro)]
    (n_tokens,) = distributed.all_sum(d, sum(int(r.response_lens_B.sum()) for r in rollouts))
    run.optimizer.zero_grad(set_to_none=True)
    local_loss = 0.0
    for i, rollout in enumerate(rollouts):
        with distributed.grad_sync(run.student, enabled=i == len(rollouts) - 1):
            loss = _micro_loss(run, rollout, max(n_tokens, 1.0) / d.world)
            loss.backward()
        local_loss += loss.item()
    loss_sum, rebuilds = distributed.all_sum(d, local_loss, sum(r.teacher_rebuilds for r in rollouts))
    total_loss = loss_sum / d.world
    grad_norm = distributed.clip_grad_norm(run.student, cfg.optim.grad_clip)
    finite = math.isfinite(total_loss) and math.isfinite(grad_norm)
    if finite:
        run.optimizer.step()
        distributed.refresh_policy(run.student, run.policy)
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    diags = [x for part in distributed.gather(d, [x for r in rollouts for x in r.diagnostics]) for x in part]
    elapsed = time.perf_counter() - started
    return {"step": run.step + 1, "method": cfg.method.name, "behavior": name, "eps": eps, "loss": total_loss,
            "grad_norm": grad_norm, "skipped": not finite, "lr": run.scheduler.get_last_lr()[0],
            "response_len": n_tokens / cfg.train.batch_size, "tokens": int(n_tokens),
            "tokens_per_s": n_tokens / elapsed, "step_s": elapsed, "session_rebuilds": int(rebuilds),
            **summarize(diags)}


def _save(run: Run) -> None:
    """Rank 0 writes the checkpoint; every rank calls this (FSDP gathers the optimizer state)."""
    optimizer = distributed.optimizer_state(run.student, run.optimizer, run.dist)
    if run.dist.main:
        state = {"step": run.step, "optimizer": optimizer, "scheduler": run.scheduler.state_dict(),
                 "rng": checkpoint.rng_state(), "config": run.cfg.public()}
        checkpoint.save(run.out / "checkpoints", run.step, run.policy, run.tokenizer, state,
                        run.cfg.train.keep_checkpoints)


async def evaluate_now(run: Run, probe: Any, eval_set: list) -> dict[str, float]:
    run.policy.eval()
    return {"step": run.step, "eval_accuracy": accuracy(run.policy, run.tokenizer, eval_set,
                                                        run.cfg.train.max_new_tokens, run.data.verify,
                                                        run.cfg.data.eval_batch_size),
            "probe_kl": probe_kl(run.policy, probe)}


async def _evaluator(run: Run) -> Callable[[], Awaitable[dict[str, Any]]]:
    """Rank 0's eval (held-out accuracy and the KL probe); the other ranks' returns nothing."""
    if not run.dist.main:
        async def nothing() -> dict[str, Any]:
            return {}
        return nothing
    probe = await build_probe(run.data.probe_set(), run.tokenizer, run.teacher, run.cfg.teacher.top_k)
    return functools.partial(evaluate_now, run, probe, run.data.eval_set())


async def train(cfg: Config, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) a distillation run, on every rank under torchrun; returns the end-of-run summary."""
    d = distributed.init(cfg.student.device)
    try:
        return await _train(cfg, resume, d)
    finally:
        distributed.shutdown(d)


async def _train(cfg: Config, resume: bool, d: Dist) -> dict[str, Any]:
    if cfg.train.batch_size % (d.world * cfg.optim.accum_steps):
        raise TrainingError(f"train.batch_size={cfg.train.batch_size} is the global batch: it must divide by "
                            f"world size x optim.accum_steps = {d.world} x {cfg.optim.accum_steps}")
    startup.check_sources(cfg, student=not resume)
    out = Path(cfg.train.out_dir)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.public(), sort_keys=False))
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    ckpt = checkpoint.latest(out / "checkpoints") if resume else None
    if resume and ckpt is None:
        raise TrainingError(f"--resume: no checkpoint under {out / 'checkpoints'}")
    source = str(ckpt) if ckpt else cfg.student.path
    dtype = getattr(torch, cfg.student.dtype)
    student = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(d.device)
    tokenizer = AutoTokenizer.from_pretrained(source)
    local = None
    if cfg.teacher.url is None and d.main:  # one local teacher, shared by every rank
        local = startup.start_local_teacher(cfg, out / "teacher.log")
    urls = cfg.teacher.urls or distributed.broadcast(d, [local.url] if local else None)
    try:
        async with TeacherClient(urls, client_id=f"trainer:{out.name}", timeout=cfg.teacher.timeout_s,
                                 api_key=cfg.teacher.api_key) as client:
            await startup.connect(client, cfg, tokenizer, report=startup.say if d.main else startup.quiet)
            model, policy = distributed.wrap(student, d, cfg.train.parallel)
            optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas,
                                          weight_decay=cfg.optim.weight_decay)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
            run = Run(cfg, out, model, tokenizer, client, optimizer, scheduler, TaskData(cfg.data, tokenizer),
                      policy=policy, dist=d)
            if ckpt:
                state = checkpoint.load_state(ckpt)
                distributed.load_optimizer_state(model, optimizer, state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
                checkpoint.set_rng_state(state["rng"])
                run.step = state["step"]
            return await _loop(run)
    finally:
        if local is not None:
            local.stop()


async def _loop(run: Run) -> dict[str, Any]:
    cfg = run.cfg
    log = RunLog(run.out, cfg.train.steps, run.step, progress=cfg.train.progress) if run.dist.main else NullLog()
    evaluate = await _evaluator(run)
    first = await evaluate() if run.step == 0 else None
    if first:
        log.log(first)
    started, bad = time.perf_counter(), 0
    try:
        while run.step < cfg.train.steps:
            record = await train_step(run)
            bad = bad + 1 if record["skipped"] else 0
            if bad:
                log.note(f"[yellow]step {record['step']}: non-finite loss or gradient; update skipped")
            if bad >= cfg.train.max_bad_steps:
                raise TrainingError(f"{bad} consecutive non-finite steps (loss={record['loss']}, "
                                    f"grad_norm={record['grad_norm']}); lower optim.lr or check the teacher")
            run.step += 1
            if cfg.train.eval_every and run.step % cfg.train.eval_every == 0 and run.step < cfg.train.steps:
                record.update(await evaluate())
            log.log(record)
            log.advance(record)
            if cfg.train.save_every and run.step % cfg.train.save_every == 0:
                _save(run)
        last = await evaluate()
        log.log({**last, "final": True})
        _save(run)
        distributed.barrier(run.dist)  # every rank returns once the last checkpoint is on disk
    except BaseException:
        log.close()
        raise
    summary = {"steps": run.step, "final_accuracy": last.get("eval_accuracy"), "final_probe_kl": last.get("probe_kl"),
               "wall_s": round(time.perf_counter() - started, 1), "out_dir": str(run.out)}
    if first:
        summary = {"initial_accuracy": first["eval_accuracy"], "initial_probe_kl": first["probe_kl"], **summary}
    log.close(summary)
    return summary


def train_sync(cfg: Config, resume: bool = False) -> dict[str, Any]:
    return asyncio.run(train(cfg, resume))
