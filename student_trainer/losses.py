"""The distillation loss: per-prefix reverse KL(π_S || π_T), analytic over the vocabulary.

The loss is the same for every behavior policy (docs/trb-method.md §2): the sampled prefixes are
data, the gradient flows through π_S(·|h_t) only, and no importance weight is needed.

Normalisation: token-mean over the batch, i.e. the sum of the per-token KL over all response
positions of all sequences divided by the number of those positions. Longer responses therefore
weigh more, exactly as in a token-level cross-entropy. An all-masked batch gives exactly 0.
Both distributions are taken at temperature 1.
"""

from __future__ import annotations

import torch

from student_trainer.blend import LOG_FLOOR, kl
from student_trainer.topk import TeacherTopK, topk_reverse_kl


def per_token_reverse_kl(
    student_logits_B_T_V: torch.Tensor,
    teacher: torch.Tensor | TeacherTopK,
    mask_B_T: torch.Tensor,
) -> torch.Tensor:
    """KL(π_S || π_T) at each masked position, 0 elsewhere; (B, T), differentiable in the student.

    Only masked rows are evaluated, so prompt and padding positions (whose teacher values may be
    garbage) can neither cost compute nor leak NaN into the gradient.

    Args:
        student_logits_B_T_V: student logits; any float dtype, computed in float32 or wider.
        teacher: full teacher log-probs (B, T, V), or a TeacherTopK whose `ids` / `logprobs` are
            (B, T, K) and optional `tail_logprob` (B, T); the top-k form uses the §5 completion.
        mask_B_T: 1 on response positions up to and including EOS, 0 on prompt and padding.
    """
    mask_B_T = mask_B_T.bool()
    dtype = torch.promote_types(student_logits_B_T_V.dtype, torch.float32)
    student_logp_M_V = student_logits_B_T_V[mask_B_T].to(dtype).log_softmax(-1)
    if isinstance(teacher, TeacherTopK):
        kl_M = topk_reverse_kl(student_logp_M_V, teacher.select(mask_B_T))
    else:
        if teacher.shape != student_logits_B_T_V.shape:
            shapes = f"{tuple(teacher.shape)} != {tuple(student_logits_B_T_V.shape)}"
            raise ValueError(f"teacher log-probs vs student logits: {shapes}")
        # A -inf teacher entry (masked vocab) under student mass would make the loss infinite.
        kl_M = kl(student_logp_M_V, teacher[mask_B_T].to(dtype).clamp_min(LOG_FLOOR))
    # Rounding can put an exact-zero KL a hair below 0; the clamp keeps the loss nonnegative.
    kl_M = kl_M.clamp_min(0.0)
    return kl_M.new_zeros(mask_B_T.shape).masked_scatter(mask_B_T, kl_M)


def reverse_kl_loss(
    student_logits_B_T_V: torch.Tensor,
    teacher: torch.Tensor | TeacherTopK,
    mask_B_T: torch.Tensor,
    n_tokens: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token-mean loss, detached per-token KL (B, T) for logging); see the module docstring.

    `n_tokens` replaces this batch's token count as the divisor when the batch is one part of a
    larger one (micro-batches, ranks): the parts' losses then add up to the whole batch's token-mean.
    """
    kl_B_T = per_token_reverse_kl(student_logits_B_T_V, teacher, mask_B_T)
    if n_tokens is None:
        n_tokens = mask_B_T.bool().sum().clamp_min(1)
    return kl_B_T.sum() / n_tokens, kl_B_T.detach()
