"""The SFT warmup's losses: fit the student to teacher-sampled responses before OPD starts.

The standard SFT warmup of the distillation literature trains on the teacher's own responses with
the ordinary next-token cross-entropy (the NLL of each sampled teacher token), or with a forward
KL to the teacher's next-token distribution at each of those prefixes. Both are per-row functions
of the student's log-probs at the loss positions; the rollout supplies the tokens (the token at
column p+1 is the target of logit position p, rollout.py) and the teacher's top-k.
"""

from __future__ import annotations

import torch

from student_trainer.methods.blend import LOG_FLOOR, kl
from student_trainer.methods.topk import TeacherTopK, reduce


def cross_entropy_rows(student_logp_N_V: torch.Tensor, tokens_N: torch.Tensor) -> torch.Tensor:
    """−log π_S(token) per row (N,): the NLL of the sampled next token.

    Floored at −LOG_FLOOR (1e4), so a token the student gives probability 0 costs a large finite
    loss with a zero gradient, as a -inf teacher entry does in the KL losses.
    """
    return -student_logp_N_V.gather(-1, tokens_N.long().unsqueeze(-1)).squeeze(-1).clamp_min(LOG_FLOOR)


def forward_kl_rows(student_logp_N_V: torch.Tensor, teacher: torch.Tensor | TeacherTopK) -> torch.Tensor:
    """KL(π_T ‖ π_S) per row (N,), differentiable in the student.

    With a top-k teacher, π_T is completed off the top-k in the student's shape (topk.py), and
    the (k+1)-category KL(t_red ‖ s_red) is then exact: inside the tail both sides are ∝ π_S.
    The teacher side is renormalised, so float16 logprobs that sum a hair off 1 give a distribution.
    """
    if isinstance(teacher, TeacherTopK):
        s_red, t_red = reduce(student_logp_N_V, teacher)
        return kl(t_red.log_softmax(-1), s_red.clamp_min(LOG_FLOOR))
    t = teacher.detach().to(student_logp_N_V.dtype).clamp_min(LOG_FLOOR).log_softmax(-1)
    return kl(t, student_logp_N_V.clamp_min(LOG_FLOOR))
