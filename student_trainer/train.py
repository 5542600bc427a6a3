"""The training loop: roll out under the behavior policy, fetch teacher targets, minimise reverse KL.

    for step k:
        ε_k   = budget(schedule, k)                        # TRB anneals it to 0 over K steps
        batch = rollouts of the student under μ (blend / SKD / teacher / student) at ε_k
        targets = teacher top-k at every response prefix   # kept from the rollout, or one score call
        loss  = mean over response tokens of KL(π_S || π̂_T); AdamW step

Everything a resumed run needs is a function of (seed, step) or lives in the checkpoint.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from shared.kv_decode import position_ids
from student_trainer import checkpoint
from student_trainer.behaviors import Behavior, make_behavior
from student_trainer.config import Config
from student_trainer.data import TaskData
from student_trainer.evaluation import accuracy, build_probe, probe_kl
from student_trainer.local_teacher import LocalTeacher
from student_trainer.losses import reverse_kl_loss
from student_trainer.rollout import Rollout, generate, score_targets, summarize
from student_trainer.run_log import RunLog
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


def _micro_loss(run: Run, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    logits = run.student(input_ids=rollout.tokens_B_T, attention_mask=rollout.attention_mask_B_T,
                         position_ids=position_ids(rollout.attention_mask_B_T)).logits
    return reverse_kl_loss(logits, rollout.targets, rollout.loss_mask_B_T)


async def train_step(run: Run) -> dict[str, Any]:
    """One optimizer step over `accum_steps` micro-batches; a non-finite step is skipped, not applied."""
    cfg, started = run.cfg, time.perf_counter()
    name, eps = method_plan(cfg, run.step)
    behavior = _behavior(cfg, name)
    generator = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + run.step)
    problems = run.data.train_batch(run.step, cfg.train.batch_size)
    micro = cfg.train.batch_size // cfg.optim.accum_steps
    tok, eos, pad = run.tokenizer, run.tokenizer.eos_token_id, run.tokenizer.pad_token_id
    total_loss, n_tokens, lengths, diags, rebuilds = 0.0, 0, [], [], 0
    run.optimizer.zero_grad(set_to_none=True)
    for i in range(0, cfg.train.batch_size, micro):
        prompts = [tok(p.prompt, add_special_tokens=False)["input_ids"] for p in problems[i : i + micro]]
        run.student.eval()
        rollout = await generate(run.student, prompts, behavior, eps, run.teacher, cfg.teacher.top_k,
                                 cfg.train.max_new_tokens, eos, pad, generator)
        if rollout.targets is None:
            rollout.targets = await score_targets(rollout, run.teacher, cfg.teacher.top_k, pad)
        run.student.train()
        loss, _ = _micro_loss(run, rollout)
        (loss / cfg.optim.accum_steps).backward()
        total_loss += loss.item() / cfg.optim.accum_steps
        n_tokens += int(rollout.response_lens_B.sum())
        lengths.append(rollout.response_lens_B.float())
        diags += rollout.diagnostics
        rebuilds += rollout.teacher_rebuilds
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.student.parameters(), cfg.optim.grad_clip))
    finite = math.isfinite(total_loss) and math.isfinite(grad_norm)
    if finite:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    elapsed = time.perf_counter() - started
    return {"step": run.step + 1, "method": cfg.method.name, "behavior": name, "eps": eps, "loss": total_loss,
            "grad_norm": grad_norm, "skipped": not finite, "lr": run.scheduler.get_last_lr()[0],
            "response_len": float(torch.cat(lengths).mean()), "tokens": n_tokens,
            "tokens_per_s": n_tokens / elapsed, "step_s": elapsed, "session_rebuilds": rebuilds,
            **summarize(diags)}


def _state(run: Run) -> dict[str, Any]:
    return {"step": run.step, "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
            "rng": checkpoint.rng_state(), "config": run.cfg.public()}


async def evaluate_now(run: Run, probe: Any, eval_set: list) -> dict[str, float]:
    run.student.eval()
    return {"step": run.step, "eval_accuracy": accuracy(run.student, run.tokenizer, eval_set,
                                                        run.cfg.train.max_new_tokens, run.data.verify,
                                                        run.cfg.data.eval_batch_size),
            "probe_kl": probe_kl(run.student, probe)}


async def train(cfg: Config, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) a distillation run; returns the end-of-run summary."""
    out = Path(cfg.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.public(), sort_keys=False))
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    ckpt = checkpoint.latest(out / "checkpoints") if resume else None
    if resume and ckpt is None:
        raise TrainingError(f"--resume: no checkpoint under {out / 'checkpoints'}")
    source = str(ckpt) if ckpt else cfg.student.path
    dtype = getattr(torch, cfg.student.dtype)
    student = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(cfg.student.device)
    tokenizer = AutoTokenizer.from_pretrained(source)
    local = None
    if cfg.teacher.url is None:
        local = LocalTeacher(cfg.teacher.model, threads=cfg.teacher.threads, log=out / "teacher.log").wait_ready()
    urls = cfg.teacher.urls or [local.url]
    try:
        async with TeacherClient(urls, client_id=f"trainer:{out.name}", timeout=cfg.teacher.timeout_s,
                                 api_key=cfg.teacher.api_key) as client:
            await client.wait_ready()
            await client.check_tokenizer(tokenizer)
            optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas,
                                          weight_decay=cfg.optim.weight_decay)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
            run = Run(cfg, out, student, tokenizer, client, optimizer, scheduler, TaskData(cfg.data, tokenizer))
            if ckpt:
                state = checkpoint.load_state(ckpt)
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
                checkpoint.set_rng_state(state["rng"])
                run.step = state["step"]
            return await _loop(run)
    finally:
        if local is not None:
            local.stop()


async def _loop(run: Run) -> dict[str, Any]:
    cfg = run.cfg
    log = RunLog(run.out, cfg.train.steps, run.step, progress=cfg.train.progress)
    probe = await build_probe(run.data.probe_set(), run.tokenizer, run.teacher, cfg.teacher.top_k)
    eval_set = run.data.eval_set()
    first = await evaluate_now(run, probe, eval_set) if run.step == 0 else None
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
                record.update(await evaluate_now(run, probe, eval_set))
            log.log(record)
            log.advance(record)
            if cfg.train.save_every and run.step % cfg.train.save_every == 0:
                checkpoint.save(run.out / "checkpoints", run.step, run.student, run.tokenizer, _state(run),
                                cfg.train.keep_checkpoints)
        last = await evaluate_now(run, probe, eval_set)
        log.log({**last, "final": True})
        checkpoint.save(run.out / "checkpoints", run.step, run.student, run.tokenizer, _state(run),
                        cfg.train.keep_checkpoints)
    except BaseException:
        log.close()
        raise
    summary = {"steps": run.step, "final_accuracy": last["eval_accuracy"], "final_probe_kl": last["probe_kl"],
               "wall_s": round(time.perf_counter() - started, 1), "out_dir": str(run.out)}
    if first:
        summary = {"initial_accuracy": first["eval_accuracy"], "initial_probe_kl": first["probe_kl"], **summary}
    log.close(summary)
    return summary


def train_sync(cfg: Config, resume: bool = False) -> dict[str, Any]:
    return asyncio.run(train(cfg, resume))
