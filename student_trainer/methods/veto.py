"""Veto (Jang et al., arXiv 2601.07155): the loss's target is a bridge between teacher and student.

Veto keeps pure student rollouts and changes what the student is fitted to. At each prefix the
target is the normalised product of the teacher and the student raised to β, a geometric bridge
in logit space (a product of experts: mass only where both agree):

    log q_β(a) = log π_T(a) + β·sg[log π_S(a)] − log Z,    Z = Σ_a π_T(a)·π_S(a)^β

sg[·] is a stop-gradient: q_β is a fixed target and the gradient flows only through the π_S being
fitted. The loss is forward KL(q_β ‖ π_S) (the paper's main form) or reverse KL(π_S ‖ q_β).
In the forward form the gradient in the student's logits is π_S − q_β, so a token the student
gives ~0 also gets ~0 target mass and no push: the "adaptive gradient veto". β = 0 is the plain
teacher target: forward KL(π_T ‖ π_S), or OPD's reverse KL(π_S ‖ π_T). β decays linearly to 0
over the run (train.py). Where this comes from, and what we chose: docs/methods.md.

Top-k form. With the teacher known on its top-k `S` and completed off `S` in the student's shape
(topk.py), q_β off `S` is ∝ π_S^(1+β): not the student's shape unless β = 0, so unlike TRB's blend
the (k+1) categories alone are not enough. The chain rule of KL over the partition {each id of S,
the tail} makes the reduction exact with one term inside the tail:

    KL(p ‖ q) = KL(p_red ‖ q_red) + p_red(tail) · KL(p(·|tail) ‖ q(·|tail))

with tail conditionals u ∝ π_S and w ∝ π_S^(1+β) on V∖S, each one pass over the vocabulary. At
β = 0, w = u and the term vanishes (TRB's case).
"""

from __future__ import annotations

from typing import Literal

import torch

from student_trainer.methods.blend import LOG_FLOOR, kl
from student_trainer.methods.topk import TeacherTopK, _in_topk_N_V, reduce

Divergence = Literal["forward", "reverse"]


def veto_target(student_logp_N_V: torch.Tensor, teacher_logp_N_V: torch.Tensor, beta: float) -> torch.Tensor:
    """log q_β over the vocabulary, detached: log-softmax(log π_T + β·log π_S)."""
    s = student_logp_N_V.detach().clamp_min(LOG_FLOOR)
    t = teacher_logp_N_V.detach().to(s.dtype).clamp_min(LOG_FLOOR)  # a -inf teacher entry: finite
    return (t + beta * s).log_softmax(-1)


def _fit(student_logp: torch.Tensor, target_logp: torch.Tensor, divergence: Divergence) -> torch.Tensor:
    if divergence == "forward":  # KL(q ‖ π_S): a student -inf under target mass costs 1e4, not inf
        return kl(target_logp, student_logp.clamp_min(LOG_FLOOR))
    if divergence == "reverse":  # KL(π_S ‖ q)
        return kl(student_logp, target_logp)
    raise ValueError(f"veto divergence must be 'forward' or 'reverse', got {divergence!r}")


def veto_loss_rows(
    student_logp_N_V: torch.Tensor,
    teacher: torch.Tensor | TeacherTopK,
    beta: float,
    divergence: Divergence = "forward",
) -> torch.Tensor:
    """Veto's loss per row (N,), differentiable in the student; see the module docstring.

    Args:
        student_logp_N_V: log π_S at N positions (normalised, float32 or wider).
        teacher: full log π_T (N, V), or a TeacherTopK with (N, K) fields; the top-k form is
            exactly the full form against topk.complete_teacher.
        beta: the bridge's exponent on the student, >= 0.
        divergence: "forward" for KL(q_β ‖ π_S), "reverse" for KL(π_S ‖ q_β).
    """
    if beta < 0:
        raise ValueError(f"veto beta must be >= 0, got {beta}")
    if isinstance(teacher, TeacherTopK):
        return _topk_veto_rows(student_logp_N_V, teacher, beta, divergence)
    return _fit(student_logp_N_V, veto_target(student_logp_N_V, teacher, beta), divergence)


def _topk_veto_rows(s_N_V: torch.Tensor, topk: TeacherTopK, beta: float, divergence: Divergence) -> torch.Tensor:
    s_red, t_red = reduce(s_N_V, topk)  # (N, K+1), student live, last column the tail
    # Off S, one pass: log u ∝ log π_S (live) and log w ∝ (1+β)·sg[log π_S], the tail conditionals.
    off_s_N_V = s_N_V.clamp_min(LOG_FLOOR).masked_fill(_in_topk_N_V(s_N_V, topk.ids), LOG_FLOOR)
    log_u = off_s_N_V.log_softmax(-1)
    log_w = ((1.0 + beta) * off_s_N_V.detach()).log_softmax(-1)
    # Unnormalised q_β on the k+1 categories: π_T·π_S^β on S; on the tail
    # T_tail·S_tail^β·Σ_tail u^(1+β), i.e. the same plus log Σ_tail u^(1+β) (0 when β = 0).
    tail_shape_N = ((1.0 + beta) * log_u.detach()).logsumexp(-1)
    bonus = torch.cat([torch.zeros_like(s_red[:, :-1]), tail_shape_N.unsqueeze(-1)], -1)
    q_red = (t_red.detach() + beta * s_red.detach().clamp_min(LOG_FLOOR) + bonus).log_softmax(-1)
    if divergence == "forward":
        inside = q_red[:, -1].exp() * kl(log_w, log_u)
    elif divergence == "reverse":
        inside = s_red[:, -1].exp() * kl(log_u, log_w)
    else:
        raise ValueError(f"veto divergence must be 'forward' or 'reverse', got {divergence!r}")
    return _fit(s_red, q_red, divergence) + inside
