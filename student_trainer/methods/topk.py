"""The exact (k+1)-category form of blending, sampling and the loss under a top-k teacher.

The server returns the teacher's top-k `S` only. We complete the teacher off `S` with the
student's shape, `π̂_T(a) = T_tail · π_S(a) / S_tail` (docs/method.md §5). Under that
completion every quantity (β*, the blend, KL(π_S || π̂_T)) depends on the k teacher ids plus one
"tail" bucket, so nothing below costs more than one pass over the vocabulary.

Categories of a reduced vector: columns 0..K-1 are the ids in `S`, column K is the tail.
Assumes the K ids of a row are distinct.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from student_trainer.methods.blend import LOG_FLOOR, kl
from student_trainer.methods.row_generators import Generator, uniform

# Tails are clamped to log(1e-30): a teacher top-k that sums to >= 1 after rounding, a student
# with (almost) no mass off S, or K = V, then still give finite logs and gradients.
TAIL_LOG_FLOOR = math.log(1e-30)


@dataclass(frozen=True)
class TeacherTopK:
    """The teacher's top-k at N prefixes. `losses` also takes (B, T, K) fields with a (B, T) tail."""

    ids: torch.Tensor  # (N, K) long, most likely first; int32 from the wire is cast to long
    logprobs: torch.Tensor  # (N, K) log π_T of `ids`
    tail_logprob: torch.Tensor | None = None  # (N,) log of the teacher's mass off the top-k, if exact

    def __post_init__(self) -> None:
        if self.ids.dtype != torch.long:  # gather / scatter index with int64 only
            object.__setattr__(self, "ids", self.ids.long())

    def tail(self) -> torch.Tensor:
        """log T_tail per row, floored: the server's exact value when given, else log(1 − Σ_S π_T)."""
        if self.tail_logprob is not None:
            return _float(self.tail_logprob).clamp_min(TAIL_LOG_FLOOR)
        top_mass = _float(self.logprobs).logsumexp(-1)  # (N,) log Σ_S π_T
        return log1mexp(top_mass).clamp_min(TAIL_LOG_FLOOR)

    def to(self, device: torch.device | str) -> TeacherTopK:
        tail = None if self.tail_logprob is None else self.tail_logprob.to(device)
        return TeacherTopK(self.ids.to(device), self.logprobs.to(device), tail)

    def select(self, index: torch.Tensor) -> TeacherTopK:
        """Rows picked by a boolean mask or index over the leading dims (e.g. response positions)."""
        tail = None if self.tail_logprob is None else self.tail_logprob[index]
        return TeacherTopK(self.ids[index], self.logprobs[index], tail)


def _float(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def log1mexp(log_x: torch.Tensor) -> torch.Tensor:
    """log(1 − x) from log x, accurate near both ends; log x >= 0 (rounding) gives -inf."""
    log_x = log_x.clamp_max(0.0)
    near_one = log_x > -math.log(2.0)
    safe_near = torch.where(near_one, log_x, torch.full_like(log_x, -1.0))
    safe_far = torch.where(near_one, torch.full_like(log_x, -1.0), log_x)
    return torch.where(near_one, torch.log(-torch.expm1(safe_near)), torch.log1p(-torch.exp(safe_far)))


def _in_topk_N_V(student_logp_N_V: torch.Tensor, ids_N_K: torch.Tensor) -> torch.Tensor:
    in_s = torch.zeros(student_logp_N_V.shape, dtype=torch.bool, device=student_logp_N_V.device)
    return in_s.scatter(-1, ids_N_K, True)


def student_tail(student_logp_N_V: torch.Tensor, ids_N_K: torch.Tensor) -> torch.Tensor:
    """log S_tail = logsumexp of log π_S off S: no 1 − Σ cancellation when S holds ~all mass."""
    in_s_N_V = _in_topk_N_V(student_logp_N_V, ids_N_K)
    off_s = student_logp_N_V.clamp_min(LOG_FLOOR).masked_fill(in_s_N_V, LOG_FLOOR)  # no -inf: finite grads
    return off_s.logsumexp(-1).clamp_min(TAIL_LOG_FLOOR)  # (N,)


def reduce(student_logp_N_V: torch.Tensor, topk: TeacherTopK) -> tuple[torch.Tensor, torch.Tensor]:
    """(k+1)-category log-probs (student, completed teacher); differentiable in the student."""
    s_top_N_K = student_logp_N_V.gather(-1, topk.ids)
    s_red = torch.cat([s_top_N_K, student_tail(student_logp_N_V, topk.ids).unsqueeze(-1)], -1)
    # A -inf teacher entry (k above the teacher's support) floored as in the full form: finite loss.
    t_top_N_K = _float(topk.logprobs).to(s_red.dtype).clamp_min(LOG_FLOOR)
    t_red = torch.cat([t_top_N_K, topk.tail().to(s_red.dtype).unsqueeze(-1)], -1)
    return s_red, t_red  # (N, K+1) each


def complete_teacher(student_logp_N_V: torch.Tensor, topk: TeacherTopK) -> torch.Tensor:
    """Full-vocabulary log π̂_T: π_T on S, T_tail·π_S/S_tail off S. The reference for `reduce`."""
    shift_N = topk.tail().to(student_logp_N_V.dtype) - student_tail(student_logp_N_V, topk.ids)
    off_s_N_V = student_logp_N_V + shift_N.unsqueeze(-1)
    return off_s_N_V.scatter(-1, topk.ids, _float(topk.logprobs).to(student_logp_N_V.dtype))


def completed_logprob_of(
    student_logp_N_V: torch.Tensor, topk: TeacherTopK, tokens_N: torch.Tensor
) -> torch.Tensor:
    """log π̂_T(token) per row: exact on S, the tail completion's value off S."""
    hit_N_K = topk.ids == tokens_N.unsqueeze(-1)
    t_top_N_K = _float(topk.logprobs).to(student_logp_N_V.dtype)
    on_s_N = torch.where(hit_N_K, t_top_N_K, torch.full_like(t_top_N_K, -math.inf)).amax(-1)
    s_tok_N = student_logp_N_V.gather(-1, tokens_N.unsqueeze(-1)).squeeze(-1)
    off_s_N = topk.tail().to(s_tok_N.dtype) + s_tok_N - student_tail(student_logp_N_V, topk.ids)
    return torch.where(hit_N_K.any(-1), on_s_N, off_s_N)


def scored_logprob_of(topk: TeacherTopK, tokens_N: torch.Tensor) -> torch.Tensor:
    """log π_T(token) per row from the teacher's answer alone: exact on S, log T_tail off S.

    Off S it is an upper bound (the token has at most the tail's mass), and it needs no student, so
    it measures the teacher's view of sampled tokens alike for every behavior, including those that
    never saw the teacher while sampling (OPD scores after the rollout).
    """
    hit_N_K = topk.ids == tokens_N.unsqueeze(-1)
    t_top_N_K = _float(topk.logprobs)
    on_s_N = torch.where(hit_N_K, t_top_N_K, torch.full_like(t_top_N_K, -math.inf)).amax(-1)
    return torch.where(hit_N_K.any(-1), on_s_N, topk.tail())


def topk_reverse_kl(student_logp_N_V: torch.Tensor, topk: TeacherTopK) -> torch.Tensor:
    """KL(π_S || π̂_T) per row = Σ_S π_S(log π_S − log π_T) + S_tail(log S_tail − log T_tail).

    Equal to the full-vocabulary KL against `complete_teacher`, and a lower bound on the KL
    against the true teacher (merging the tail into one bucket never increases KL).
    """
    s_red, t_red = reduce(student_logp_N_V, topk)
    return kl(s_red, t_red)


def sample_categorical(logp_N_C: torch.Tensor, generator: Generator = None) -> torch.Tensor:
    """One draw per row by Gumbel-max; needs no normalisation and tolerates -inf entries."""
    u = uniform(logp_N_C.shape, generator, logp_N_C.device)
    gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(torch.float32).tiny)))
    return (_float(logp_N_C) + gumbel.to(_float(logp_N_C).dtype)).argmax(-1)


def sample_reduced(
    student_logp_N_V: torch.Tensor,
    ids_N_K: torch.Tensor,
    mix_logp_N_K1: torch.Tensor,
    generator: Generator = None,
) -> torch.Tensor:
    """Token ids (N,) from a (k+1)-category distribution: a tail draw is a student draw off S.

    Every row draws its off-S candidate, used or not: picking only the rows that fell in the tail
    would need their indices on the host, a second device sync per decode step (the first is the
    tokens the teacher request carries).
    """
    category_N = sample_categorical(mix_logp_N_K1, generator)
    n_top = ids_N_K.shape[-1]
    if n_top == 0:  # no top-k at all: every draw is a tail draw
        return sample_categorical(student_logp_N_V, generator)
    top_N = ids_N_K.gather(-1, category_N.clamp_max(n_top - 1).unsqueeze(-1)).squeeze(-1)
    off_s_N_V = student_logp_N_V.masked_fill(_in_topk_N_V(student_logp_N_V, ids_N_K), -math.inf)
    return torch.where(category_N == n_top, sample_categorical(off_s_N_V, generator), top_N)
