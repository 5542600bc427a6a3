"""Held-out accuracy (greedy pass@1) and the KL probe: KL(π_S || π_T) on fixed reference text."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from decoders.kv_decode import position_ids
from student_trainer.methods.losses import reverse_kl_loss
from student_trainer.methods.topk import TeacherTopK
from student_trainer.tasks import arithmetic
from student_trainer.tasks.arithmetic import Problem
from student_trainer.tasks.base_model import evaluate
from student_trainer.teacher.client import TeacherClient
from student_trainer.training.run import Run


@dataclass
class Probe:
    """Right-padded reference sequences with the teacher's top-k at every solution position."""

    tokens_B_T: torch.Tensor
    attention_B_T: torch.Tensor
    mask_B_T: torch.Tensor  # loss positions (those predicting a solution token or EOS)
    targets: TeacherTopK


async def build_probe(problems: list[Problem], tokenizer, teacher: TeacherClient, top_k: int) -> Probe:
    seqs, starts = [], []
    for p in problems:
        prompt = tokenizer(p.prompt, add_special_tokens=False)["input_ids"]
        full = prompt + tokenizer(p.solution, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seqs.append(full)
        starts.append(len(prompt) - 1)
    scored = await teacher.score([s[:-1] for s in seqs], start=starts, top_k=top_k)
    width = max(len(s) for s in seqs)
    batch = len(seqs)
    tokens = torch.full((batch, width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros((batch, width), dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.bool)
    ids, lps, tail = torch.zeros((batch, width, top_k), dtype=torch.long), torch.zeros((batch, width, top_k)), \
        torch.zeros((batch, width))
    for b, (seq, start, s) in enumerate(zip(seqs, starts, scored, strict=True)):
        n = len(seq) - 1 - start
        tokens[b, : len(seq)], attention[b, : len(seq)] = torch.tensor(seq), 1
        mask[b, start : start + n] = True
        ids[b, start : start + n], lps[b, start : start + n], tail[b, start : start + n] = \
            s.topk.ids, s.topk.logprobs, s.topk.tail()
    return Probe(tokens, attention, mask, TeacherTopK(ids, lps, tail))


@torch.no_grad()
def probe_kl(student: torch.nn.Module, probe: Probe) -> float:
    device = next(student.parameters()).device
    attention_B_T, t = probe.attention_B_T.to(device), probe.targets
    logits = student(input_ids=probe.tokens_B_T.to(device), attention_mask=attention_B_T,
                     position_ids=position_ids(attention_B_T)).logits
    targets = TeacherTopK(t.ids.to(device), t.logprobs.to(device), t.tail_logprob.to(device))
    loss, _ = reverse_kl_loss(logits, targets, probe.mask_B_T.to(device))
    return float(loss)


def accuracy(student: torch.nn.Module, tokenizer, problems: list[Problem], max_new_tokens: int,
             verifier: Callable[[str, Problem], bool] = arithmetic.verify, batch_size: int = 256) -> float:
    """Greedy pass@1 with the task verifier (pass the run's `TaskData.verify`; arithmetic's by default)."""
    acc, _ = evaluate(student, tokenizer, problems, max_new_tokens=max_new_tokens, batch_size=batch_size,
                      verifier=verifier)
    return acc


async def evaluator(run: Run) -> Callable[[], dict[str, Any]]:
    """Rank 0's eval at the run's current step (held-out accuracy and the KL probe, built once here);
    the other ranks' returns nothing."""
    if not run.dist.main:
        return dict
    probe = await build_probe(run.data.probe_set(), run.tokenizer, run.teacher, run.cfg.teacher.top_k)
    eval_set = run.data.eval_set()

    def at_this_step() -> dict[str, Any]:
        run.policy.eval()
        cfg = run.cfg
        return {"step": run.step,
                "eval_accuracy": accuracy(run.policy, run.tokenizer, eval_set, cfg.train.max_new_tokens,
                                          run.data.verify, cfg.data.eval_batch_size),
                "probe_kl": probe_kl(run.policy, probe)}

    return at_this_step
