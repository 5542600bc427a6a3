"""One optimizer step's update from its rollouts: the token-mean loss, its gradient, AdamW, the step's metrics."""

from __future__ import annotations

import math
import time
from typing import Any

from student_trainer.methods import plan
from student_trainer.rollouts.batch import rollout_batch
from student_trainer.rollouts.rollout import Rollout, sampled_teacher_logprob, summarize
from student_trainer.training import distributed
from student_trainer.training.run import Run


async def train_step(run: Run) -> dict[str, Any]:
    """One optimizer step, rollouts then update (train.max_staleness=0)."""
    started = time.perf_counter()
    rollouts = await rollout_batch(run, run.step, run.policy)
    return {**learn(run, rollouts, started), "policy_version": run.step, "staleness": 0}


def learn(run: Run, rollouts: list[Rollout], started: float | None = None) -> dict[str, Any]:
    """The update of optimizer step `run.step` on its rollouts, backpropagated in `accum_steps`
    micro-batches (no event loop needed: the pipeline runs it in a worker thread).

    The loss is Σ loss over every response token of the global batch / their number (StudentLoss,
    training/student_model.py: the student's forward, lm_head a chunk of tokens at a time, and the
    per-token loss that `plan.loss_plan` names). DDP and FSDP average gradients over ranks, so each
    rank divides its sum by (global tokens / world): the average is then the gradient of that
    token-mean, whatever the world size or micro-batch split. Loss and gradient norm are global, so a
    non-finite step is skipped on every rank alike.
    """
    cfg, d, started = run.cfg, run.dist, started or time.perf_counter()
    behavior, eps = plan.behavior_plan(cfg, run.step)
    loss_name, veto_beta = plan.loss_plan(cfg, run.step)
    rows = d.rows(cfg.train.batch_size)
    (n_tokens,) = distributed.all_sum(d, sum(int(r.response_lens_B.sum()) for r in rollouts))
    micro_batches = _micro_batches(rollouts, len(rows) // cfg.optim.accum_steps)
    run.optimizer.zero_grad(set_to_none=True)
    run.student.train()
    local_loss = 0.0
    for i, mb in enumerate(micro_batches):
        with distributed.grad_sync(run.student, enabled=i == len(micro_batches) - 1):
            targets = mb.targets.to(d.device)
            loss = run.student(mb.tokens_B_T.to(d.device), mb.attention_mask_B_T.to(d.device),
                               mb.loss_mask_B_T.to(d.device), targets.ids, targets.logprobs, targets.tail_logprob,
                               max(n_tokens, 1.0) / d.world, loss_name, veto_beta)
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
    veto = {"veto_beta": veto_beta} if cfg.method.name == "veto" else {}
    return {"step": run.step + 1, "method": cfg.method.name, "behavior": behavior, "eps": eps, "loss_fn": loss_name,
            **veto, "loss": total_loss,
            "grad_norm": grad_norm, "skipped": not finite, "lr": run.scheduler.get_last_lr()[0],
            "response_len": n_tokens / cfg.train.batch_size, "tokens": int(n_tokens),
            "tokens_per_s": n_tokens / elapsed, "step_s": elapsed, "session_rebuilds": int(rebuilds),
            **loglik, **summarize(diags)}


def _micro_batches(rollouts: list[Rollout], micro: int) -> list[Rollout]:
    """Each rollout cut into backward micro-batches of `micro` rows (padding columns dropped)."""
    return [r.rows(i, i + micro) for r in rollouts for i in range(0, r.tokens_B_T.shape[0], micro)]
