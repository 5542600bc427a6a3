"""A rollout: a batch of prompts and sampled responses, its masks, and the teacher's targets (generate.py samples it).

Layout of a batch (B rows, prompts left-padded to width P):

    column   0 .. P-1         P .. P+n-1              P+n ..
    tokens   pad.. prompt     response (EOS incl.)    pad

Position p of the student's logits predicts column p+1, so the loss positions of a row are
P-1 .. P+n-2 (`loss_mask_B_T`), and `targets` holds the teacher's top-k at exactly those
positions: the one the behavior sampled from when the teacher was asked during the rollout
(docs/method.md §6), or for pure-student rollouts the teacher's answers to chunks of the response sent
while it is sampled, else one `/v1/score` call per batch afterwards (targets.py decides, with the fallbacks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from student_trainer.methods.behaviors import StepDiagnostics
from student_trainer.methods.topk import TeacherTopK, scored_logprob_of


@dataclass
class Rollout:
    tokens_B_T: torch.Tensor  # long
    attention_mask_B_T: torch.Tensor  # long, 1 on prompt and response tokens
    loss_mask_B_T: torch.Tensor  # bool, positions whose next token is a response token
    prompt_width: int
    response_lens_B: torch.Tensor  # long
    targets: TeacherTopK | None = None  # (B, T, K) at loss positions; garbage elsewhere
    diagnostics: list[tuple[torch.Tensor, StepDiagnostics]] = field(default_factory=list)  # (rows, diag)
    teacher_rebuilds: int = 0

    def rows(self, start: int, stop: int) -> Rollout:
        """Rows start..stop-1 as a batch of their own (a backward micro-batch), without the columns
        that are padding in every one of them; targets and masks move with their columns."""
        real_T = self.attention_mask_B_T[start:stop].bool().any(0)
        cols = real_T.nonzero().squeeze(-1)
        first, last = int(cols[0]), int(cols[-1]) + 1
        targets = None
        if self.targets is not None:
            t = self.targets
            tail = None if t.tail_logprob is None else t.tail_logprob[start:stop, first:last]
            targets = TeacherTopK(t.ids[start:stop, first:last], t.logprobs[start:stop, first:last], tail)
        return Rollout(self.tokens_B_T[start:stop, first:last], self.attention_mask_B_T[start:stop, first:last],
                       self.loss_mask_B_T[start:stop, first:last], self.prompt_width - first,
                       self.response_lens_B[start:stop], targets)

    @classmethod
    def of_responses(cls, prompts: list[list[int]], new_tokens_B_N: torch.Tensor, lengths_B: torch.Tensor,
                     pad_id: int) -> Rollout:
        """The batch layout above around sampled responses (row b's first `lengths_B[b]` new tokens)."""
        width = int(lengths_B.max())
        prompt_ids, prompt_mask = left_pad(prompts, pad_id)
        p = prompt_ids.shape[1]
        response_mask = torch.arange(width)[None, :] < lengths_B[:, None]
        tokens = torch.cat([prompt_ids, new_tokens_B_N[:, :width]], dim=1)
        attention = torch.cat([prompt_mask, response_mask.long()], dim=1)
        loss_mask = torch.zeros_like(tokens, dtype=torch.bool)
        loss_mask[:, p - 1 : p - 1 + width] = response_mask
        return cls(tokens, attention, loss_mask, p, lengths_B)

    def responses(self) -> list[list[int]]:
        p = self.prompt_width
        return [self.tokens_B_T[b, p : p + int(n)].tolist() for b, n in enumerate(self.response_lens_B)]


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.tensor(p)
        mask[b, width - len(p) :] = 1
    return ids, mask


def sampled_teacher_logprob(rollout: Rollout) -> tuple[float, int]:
    """(sum, count) of log π_T of the rollout's sampled response tokens, from its teacher targets
    (`scored_logprob_of`): how likely the teacher finds the prefixes it is asked to supervise."""
    if rollout.targets is None:
        return 0.0, 0
    mask_B_T = rollout.loss_mask_B_T[:, :-1]  # targets at t describe the token at t + 1
    t = rollout.targets
    tail = None if t.tail_logprob is None else t.tail_logprob[:, :-1][mask_B_T]
    topk = TeacherTopK(t.ids[:, :-1][mask_B_T], t.logprobs[:, :-1][mask_B_T], tail)
    lp_N = scored_logprob_of(topk, rollout.tokens_B_T[:, 1:][mask_B_T])
    return float(lp_N.sum()), int(lp_N.numel())


def summarize(diagnostics: list[tuple[torch.Tensor, StepDiagnostics]]) -> dict[str, Any]:
    """Token-level means and quantiles of the behavior diagnostics for logging."""
    if not diagnostics:
        return {}
    beta = torch.cat([d.beta for _, d in diagnostics]).float()
    kl = torch.cat([d.kl_to_student for _, d in diagnostics]).float()
    used = torch.cat([d.teacher_used for _, d in diagnostics]).float()
    tlp = torch.cat([d.teacher_logprob for _, d in diagnostics]).float()
    out: dict[str, Any] = {"teacher_used": used.mean().item()}
    finite_beta = beta[~beta.isnan()]
    if len(finite_beta):
        q = torch.quantile(finite_beta, torch.tensor([0.1, 0.5, 0.9]))
        # beta_one: the share of positions where the teacher itself lies inside the ball (no blending needed).
        out.update(beta_mean=finite_beta.mean().item(), beta_p10=q[0].item(), beta_p50=q[1].item(),
                   beta_p90=q[2].item(), beta_one=(finite_beta >= 1.0).float().mean().item())
    for name, x in (("kl_mu_student", kl), ("teacher_logprob", tlp)):
        x = x[~x.isnan()]
        if len(x):
            out[name] = x.mean().item()
    return out
