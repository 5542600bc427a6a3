"""The training loop: roll out under the behavior policy, fetch teacher targets, minimise reverse KL.

    for step k:
        ε_k   = budget(schedule, k)                        # TRB anneals it to 0 over K steps
        batch = rollouts of the student under μ (blend / SKD / teacher / student) at ε_k
        targets = teacher top-k at every response prefix   # kept from the rollout, or one score call
        loss  = mean over response tokens of KL(π_S || π̂_T); AdamW step
                # (Veto and the SFT warmup swap the loss: `loss_plan`, docs/methods.md)

Everything a resumed run needs is a function of (seed, step) or lives in the checkpoint.
Under torchrun each rank rolls out its slice of the global batch (distributed.py); row i of step k
samples from its own (seed, k, i) stream, so any world size gives the run one process would.
With train.max_staleness = s > 0, batch k is rolled out by the policy of step k - s while the
learner updates (pipeline.py; train.producer: a task or a process, docs/async.md); it still uses step k's
ε, behavior and loss.
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

from student_trainer import checkpoint, distributed, startup, trackers
from student_trainer.behaviors import Behavior, make_behavior
from student_trainer.config import Config
from student_trainer.data import TaskData
from student_trainer.distributed import Dist
from student_trainer.evaluation import accuracy, build_probe, probe_kl
from student_trainer.offline_data import OfflineData
from student_trainer.pipeline import Batch, producer_device
from student_trainer.producer_process import start_pipeline
from student_trainer.rollout import Rollout, generate, sampled_teacher_logprob, score_targets, summarize
from student_trainer.row_generators import RowGenerators
from student_trainer.run_log import NullLog, RunLog, quiet_transformers
from student_trainer.schedules import budget
from student_trainer.student_model import StudentLoss, compute_dtype, make_policy
from student_trainer.teacher_client import TeacherClient
from student_trainer.veto import veto_beta


class TrainingError(RuntimeError):
    pass


def method_plan(cfg: Config, step: int) -> tuple[str, float]:
    """(behavior name, ε) at an optimizer step: the only place the methods differ."""
    m = cfg.method
    if m.name == "trb":
        return "trb", budget(m.schedule, step, m.eps0, m.horizon)
    if m.name == "fixed_eps":
        return "fixed_eps", m.eps0
    if m.name in ("sft_warmup", "teacher_warmup"):
        return ("teacher", 0.0) if step < m.horizon else ("opd", 0.0)
    if m.name == "veto":
        return "opd", 0.0
    if m.name == "offline_kd":
        return "offline", 0.0  # no rollouts: stored completions (offline_data.py)
    return m.name, 0.0


def loss_plan(cfg: Config, step: int) -> tuple[str, float]:
    """(loss name from losses.LOSSES, Veto's β) at an optimizer step: reverse KL but for two methods."""
    m = cfg.method
    if m.name == "veto":
        return f"veto_{m.veto_divergence}", veto_beta(m.veto_schedule, step, m.veto_beta, cfg.train.steps)
    if m.name == "sft_warmup" and step < m.horizon:
        return m.sft_loss, 0.0
    if m.name == "offline_kd":
        return m.offline_loss, 0.0
    return "reverse_kl", 0.0


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

    def __post_init__(self) -> None:
        inner = getattr(self.student, "module", self.student)  # DDP keeps the module as .module
        if not isinstance(inner, StudentLoss):  # a bare CausalLM (tests, benches): train it as train() would
            self.student = inner = StudentLoss(self.student, self.cfg.train.loss_chunk_tokens)
        if self.lm is None:
            self.lm = inner.lm
        if self.policy is None:
            self.policy = self.lm


async def _rollout(run: Run, problems: list, rows: range, behavior: Behavior, eps: float, step: int,
                   policy: torch.nn.Module) -> Rollout:
    """Rollouts of global batch rows `rows`, each row sampled from its own (seed, step, row) stream."""
    cfg, tok = run.cfg, run.tokenizer
    prompts = [tok(p.prompt, add_special_tokens=False)["input_ids"] for p in problems]
    generator = RowGenerators.seeded(cfg.train.seed, step, rows, next(policy.parameters()).device)
    policy.eval()
    rollout = await generate(policy, prompts, behavior, eps, run.teacher, cfg.teacher.top_k,
                             cfg.train.max_new_tokens, tok.eos_token_id, tok.pad_token_id, generator,
                             decoder=cfg.student.decoder, stream_chunk=cfg.teacher.stream_chunk_tokens)
    if rollout.targets is None:
        rollout.targets = await score_targets(rollout, run.teacher, cfg.teacher.top_k, tok.pad_token_id)
    return rollout


def _micro_loss(run: Run, rollout: Rollout, n_tokens: float, loss: str = "reverse_kl",
                beta: float = 0.0) -> torch.Tensor:
    device, targets = run.dist.device, rollout.targets.to(run.dist.device)
    run.student.train()
    return run.student(rollout.tokens_B_T.to(device), rollout.attention_mask_B_T.to(device),
                       rollout.loss_mask_B_T.to(device), targets.ids, targets.logprobs, targets.tail_logprob,
                       n_tokens, loss, beta)


def _micro_batches(rollouts: list[Rollout], micro: int) -> list[Rollout]:
    """Each rollout cut into backward micro-batches of `micro` rows (padding columns dropped)."""
    return [r.rows(i, i + micro) for r in rollouts for i in range(0, r.tokens_B_T.shape[0], micro)]


async def rollout_batch(run: Run, step: int, policy: torch.nn.Module) -> list[Rollout]:
    """This rank's rows of step `step`'s batch, rolled out by `policy` under that step's behavior and ε
    (also when a stale policy samples it ahead of time: pipeline.py), `rollout_batch_size` at a time
    (one decode loop and teacher session each). Rows sample from their own streams, so the split
    changes no token."""
    cfg = run.cfg
    rows = run.dist.rows(cfg.train.batch_size)
    per_rollout = cfg.train.rollout_batch_size or len(rows)
    if run.offline is not None:  # offline_kd: stored completions with their stored teacher targets
        return run.offline.rollouts(step, cfg.train.batch_size, rows, per_rollout)
    name, eps = method_plan(cfg, step)
    behavior = _behavior(cfg, name)
    problems = run.data.train_batch(step, cfg.train.batch_size)[rows.start : rows.stop]
    return [await _rollout(run, problems[i : i + per_rollout], rows[i : i + per_rollout], behavior, eps, step, policy)
            for i in range(0, len(rows), per_rollout)]


async def train_step(run: Run) -> dict[str, Any]:
    """One optimizer step, rollouts then update (train.max_staleness=0)."""
    started = time.perf_counter()
    rollouts = await rollout_batch(run, run.step, run.policy)
    return {**learn(run, rollouts, started), "policy_version": run.step, "staleness": 0}


def learn(run: Run, rollouts: list[Rollout], started: float | None = None) -> dict[str, Any]:
    """The update of optimizer step `run.step` on its rollouts, backpropagated in `accum_steps`
    micro-batches (no event loop needed: the pipeline runs it in a worker thread).

    The loss is Σ KL over every response token of the global batch / their number. DDP and FSDP
    average gradients over ranks, so each rank divides its sum by (global tokens / world): the
    average is then the gradient of that token-mean, whatever the world size or micro-batch split.
    Loss and gradient norm are global, so a non-finite step is skipped on every rank alike.
    """
    cfg, d, started = run.cfg, run.dist, started or time.perf_counter()
    name, eps = method_plan(cfg, run.step)
    loss_name, beta = loss_plan(cfg, run.step)
    rows = d.rows(cfg.train.batch_size)
    (n_tokens,) = distributed.all_sum(d, sum(int(r.response_lens_B.sum()) for r in rollouts))
    micro_batches = _micro_batches(rollouts, len(rows) // cfg.optim.accum_steps)
    run.optimizer.zero_grad(set_to_none=True)
    local_loss = 0.0
    for i, rollout in enumerate(micro_batches):
        with distributed.grad_sync(run.student, enabled=i == len(micro_batches) - 1):
            loss = _micro_loss(run, rollout, max(n_tokens, 1.0) / d.world, loss_name, beta)
            loss.backward()
        local_loss += loss.item()
    lps = [sampled_teacher_logprob(r) for r in rollouts]  # one collective for every sum of the step
    loss_sum, rebuilds, lp_sum, lp_count = distributed.all_sum(
        d, local_loss, sum(r.teacher_rebuilds for r in rollouts), sum(x for x, _ in lps), sum(n for _, n in lps))
    total_loss = loss_sum / d.world
    grad_norm = distributed.clip_grad_norm(run.student, cfg.optim.grad_clip)
    finite = math.isfinite(total_loss) and math.isfinite(grad_norm)
    if finite:
        run.optimizer.step()
        distributed.refresh_policy(run.student, run.lm, run.policy)
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    diags = [x for part in distributed.gather(d, [x for r in rollouts for x in r.diagnostics]) for x in part]
    loglik = {"teacher_loglik": lp_sum / lp_count} if lp_count else {}
    elapsed = time.perf_counter() - started
    veto = {"veto_beta": beta} if cfg.method.name == "veto" else {}
    return {"step": run.step + 1, "method": cfg.method.name, "behavior": name, "eps": eps, "loss_fn": loss_name,
            **veto, "loss": total_loss,
            "grad_norm": grad_norm, "skipped": not finite, "lr": run.scheduler.get_last_lr()[0],
            "response_len": n_tokens / cfg.train.batch_size, "tokens": int(n_tokens),
            "tokens_per_s": n_tokens / elapsed, "step_s": elapsed, "session_rebuilds": int(rebuilds),
            **loglik, **summarize(diags)}


def _save(run: Run, in_flight: dict[int, Batch] | None = None) -> None:
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


def _check_batch_split(cfg: Config, world: int) -> None:
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
             d: Dist | None = None) -> Run:
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
               lm=student, policy=policy, dist=d, offline=offline)


async def _train(cfg: Config, resume: bool, d: Dist) -> dict[str, Any]:
    _check_batch_split(cfg, d.world)
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
    dtype = getattr(torch, cfg.student.dtype)
    student = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(d.device)
    tokenizer = AutoTokenizer.from_pretrained(source)
    local = None
    if cfg.teacher.url is None and d.main:  # one local teacher, shared by every rank
        local = startup.start_local_teacher(cfg, out / "teacher.log")
    urls = cfg.teacher.urls or distributed.broadcast(d, [local.url] if local else None)
    try:
        async with TeacherClient(urls, client_id=f"trainer:{out.name}", timeout=cfg.teacher.timeout_s,
                                 retries=cfg.teacher.retries, retry_for_s=cfg.teacher.retry_for_s,
                                 api_key=cfg.teacher.api_key) as client:
            await startup.connect(client, cfg, tokenizer, report=startup.say if d.main else startup.quiet)
            run = assemble(cfg, student, tokenizer, client, out, d)
            if ckpt:
                state = checkpoint.load_state(ckpt)
                distributed.load_optimizer_state(run.student, run.optimizer, state["optimizer"])
                run.scheduler.load_state_dict(state["scheduler"])
                checkpoint.set_rng_state(state["rng"])
                run.step = state["step"]
                distributed.refresh_policy(run.student, student, run.policy)
                in_flight = state.get("in_flight") or []
                run.in_flight = in_flight[d.rank] if len(in_flight) == d.world else {}
            return await _loop(run)
    finally:
        if local is not None:
            local.stop()


def _run_log(run: Run) -> RunLog:
    t = run.cfg.train
    tracked = trackers.open_trackers(trackers.resolve(t.report_to), run.out, run.cfg.public(), run.out.name,
                                     t.tracker_project, resume=run.step > 0)
    return RunLog(run.out, t.steps, run.step, progress=t.progress, trackers=tracked)


async def _loop(run: Run) -> dict[str, Any]:
    cfg = run.cfg
    log = _run_log(run) if run.dist.main else NullLog()
    evaluate = await _evaluator(run)
    # before the first eval, so a producer process starts up meanwhile
    pipe = start_pipeline(run, rollout_batch) if cfg.train.max_staleness else None
    try:
        first = await evaluate() if run.step == 0 else None
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
                record.update(await evaluate())
            log.log(record)
            log.advance(record)
            if cfg.train.save_every and run.step % cfg.train.save_every == 0:
                _save(run, await pipe.in_flight(run.step) if pipe else None)
        last = await evaluate()
        log.log({**last, "final": True})
        _save(run)
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


def train_sync(cfg: Config, resume: bool = False) -> dict[str, Any]:
    quiet_transformers()
    return asyncio.run(train(cfg, resume))
