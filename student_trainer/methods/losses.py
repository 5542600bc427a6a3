"""The distillation loss: per-prefix reverse KL(π_S || π_T), analytic over the vocabulary.

The loss is the same for every behavior policy (docs/method.md §2): the sampled prefixes are
data, the gradient flows through π_S(·|h_t) only, and no importance weight is needed. Two
baselines change the loss instead (docs/methods.md): Veto fits a bridge target (veto.py), and the
SFT warmup fits the teacher's tokens or distribution on teacher rollouts (sft_warmup.py). Every
loss goes through `loss_rows`, a per-row function of the student's log-probs at the loss positions.

Normalisation: token-mean over the batch, i.e. the sum of the per-token KL over all response
positions of all sequences divided by the number of those positions. Longer responses therefore
weigh more, exactly as in a token-level cross-entropy. An all-masked batch gives exactly 0.
Both distributions are taken at temperature 1.
"""

from __future__ import annotations

import torch

from student_trainer.methods.blend import LOG_FLOOR, kl
from student_trainer.methods.sft_warmup import cross_entropy_rows, forward_kl_rows
from student_trainer.methods.topk import TeacherTopK, topk_reverse_kl
from student_trainer.methods.veto import veto_loss_rows

# loss name -> what it fits; methods/plan.loss_plan picks one per optimizer step.
LOSSES = ("reverse_kl", "forward_kl", "cross_entropy", "veto_forward", "veto_reverse")


def reverse_kl_rows(student_logp_N_V: torch.Tensor, teacher: torch.Tensor | TeacherTopK) -> torch.Tensor:
    """KL(π_S || π_T) per row (N,); the top-k form uses the §5 completion."""
    if isinstance(teacher, TeacherTopK):
        return topk_reverse_kl(student_logp_N_V, teacher)
    # A -inf teacher entry (masked vocab) under student mass would make the loss infinite.
    return kl(student_logp_N_V, teacher.to(student_logp_N_V.dtype).clamp_min(LOG_FLOOR))


def loss_rows(
    name: str,
    student_logp_N_V: torch.Tensor,
    teacher_N: torch.Tensor | TeacherTopK | None,
    tokens_N: torch.Tensor | None = None,
    veto_beta: float = 0.0,
) -> torch.Tensor:
    """The named loss per row (N,) at N loss positions; the one hook every training loss goes through.

    Args:
        name: one of LOSSES.
        student_logp_N_V: log π_S (normalised, float32 or wider), differentiable.
        teacher_N: full log π_T (N, V) or a TeacherTopK with (N, K) fields (unused by cross_entropy).
        tokens_N: the sampled next token of each row (cross_entropy only).
        veto_beta: Veto's exponent on the student in its target (veto_* only).
    """
    if name == "cross_entropy":
        if tokens_N is None:
            raise ValueError("loss cross_entropy needs the sampled tokens")
        return cross_entropy_rows(student_logp_N_V, tokens_N)
    if teacher_N is None:
        raise ValueError(f"loss {name!r} needs the teacher's targets")
    if name == "reverse_kl":
        return reverse_kl_rows(student_logp_N_V, teacher_N)
    if name == "forward_kl":
        return forward_kl_rows(student_logp_N_V, teacher_N)
    if name in ("veto_forward", "veto_reverse"):
        return veto_loss_rows(student_logp_N_V, teacher_N, veto_beta, name.removeprefix("veto_"))
    raise ValueError(f"unknown loss {name!r}; valid: {', '.join(LOSSES)}")


def next_tokens(tokens_B_T: torch.Tensor) -> torch.Tensor:
    """(B, T) with the token at column p+1 in column p: what logit position p predicts (rollout.py)."""
    return torch.cat([tokens_B_T[:, 1:], torch.zeros_like(tokens_B_T[:, :1])], 1)


def per_token_loss(
    student_logits_B_T_V: torch.Tensor,
    teacher: torch.Tensor | TeacherTopK | None,
    mask_B_T: torch.Tensor,
    name: str = "reverse_kl",
    tokens_B_T: torch.Tensor | None = None,
    veto_beta: float = 0.0,
) -> torch.Tensor:
    """The named loss at each masked position, 0 elsewhere; (B, T), differentiable in the student.

    Only masked rows are evaluated, so prompt and padding positions (whose teacher values may be
    garbage) can neither cost compute nor leak NaN into the gradient.

    Args:
        student_logits_B_T_V: student logits; any float dtype, computed in float32 or wider.
        teacher: full teacher log-probs (B, T, V), or a TeacherTopK whose `ids` / `logprobs` are
            (B, T, K) and optional `tail_logprob` (B, T); the top-k form uses the §5 completion.
        mask_B_T: 1 on response positions up to and including EOS, 0 on prompt and padding.
        name, veto_beta: the loss (one of LOSSES) and Veto's β.
        tokens_B_T: the rollout's tokens (cross_entropy fits the one after each loss position).
    """
    mask_B_T = mask_B_T.bool()
    dtype = torch.promote_types(student_logits_B_T_V.dtype, torch.float32)
    student_logp_M_V = student_logits_B_T_V[mask_B_T].to(dtype).log_softmax(-1)
    if isinstance(teacher, torch.Tensor) and teacher.shape != student_logits_B_T_V.shape:
        shapes = f"{tuple(teacher.shape)} != {tuple(student_logits_B_T_V.shape)}"
        raise ValueError(f"teacher log-probs vs student logits: {shapes}")
    teacher_M = teacher.select(mask_B_T) if isinstance(teacher, TeacherTopK) else (
        None if teacher is None else teacher[mask_B_T])
    tokens_M = None if tokens_B_T is None else next_tokens(tokens_B_T)[mask_B_T]
    loss_M = loss_rows(name, student_logp_M_V, teacher_M, tokens_M, veto_beta)
    # Rounding can put an exact-zero KL a hair below 0; the clamp keeps the loss nonnegative.
    loss_M = loss_M.clamp_min(0.0)
    return loss_M.new_zeros(mask_B_T.shape).masked_scatter(mask_B_T, loss_M)


def per_token_reverse_kl(
    student_logits_B_T_V: torch.Tensor,
    teacher: torch.Tensor | TeacherTopK,
    mask_B_T: torch.Tensor,
) -> torch.Tensor:
    """KL(π_S || π_T) at each masked position, 0 elsewhere; see `per_token_loss`."""
    return per_token_loss(student_logits_B_T_V, teacher, mask_B_T)


def distill_loss(
    student_logits_B_T_V: torch.Tensor,
    teacher: torch.Tensor | TeacherTopK | None,
    mask_B_T: torch.Tensor,
    n_tokens: float | None = None,
    name: str = "reverse_kl",
    tokens_B_T: torch.Tensor | None = None,
    veto_beta: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token-mean loss, detached per-token loss (B, T) for logging); see the module docstring.

    `n_tokens` replaces this batch's token count as the divisor when the batch is one part of a
    larger one (micro-batches, ranks): the parts' losses then add up to the whole batch's token-mean.
    """
    loss_B_T = per_token_loss(student_logits_B_T_V, teacher, mask_B_T, name, tokens_B_T, veto_beta)
    if n_tokens is None:
        n_tokens = mask_B_T.bool().sum().clamp_min(1)
    return loss_B_T.sum() / n_tokens, loss_B_T.detach()


def reverse_kl_loss(
    student_logits_B_T_V: torch.Tensor,
    teacher: torch.Tensor | TeacherTopK,
    mask_B_T: torch.Tensor,
    n_tokens: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token-mean reverse KL, detached per-token KL (B, T)); see `distill_loss`."""
    return distill_loss(student_logits_B_T_V, teacher, mask_B_T, n_tokens)
