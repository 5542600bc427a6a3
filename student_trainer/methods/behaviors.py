"""Behavior policies: who picks the next token of a rollout (docs/method.md §3-§4).

Every policy has the same two methods, so the rollout loop never branches on the method name:

    needs_teacher(eps) -> bool        # ask the teacher server for its top-k at this step?
    sample(student_logits_B_V, topk, eps, generator) -> (tokens_B, StepDiagnostics)

Only the rollout changes between policies; the loss (losses.py) is the same for all of them.
Teacher quantities use the §5 top-k completion π̂_T, so they cost O(k) per row beyond one pass
over the student's vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from student_trainer.methods.blend import LOG_FLOOR, blend_logp, kl, solve_beta
from student_trainer.methods.row_generators import Generator
from student_trainer.methods.topk import (
    TeacherTopK,
    completed_logprob_of,
    log1mexp,
    reduce,
    sample_categorical,
    sample_reduced,
)


@dataclass(frozen=True)
class StepDiagnostics:
    """Per-row facts about one decode step, all (B,); NaN marks "not defined for this policy"."""

    beta: torch.Tensor  # blend weight used: 0 for the student, 1 for the teacher, NaN for SKD
    kl_to_student: torch.Tensor  # realised KL(μ || π_S) of the behavior distribution (under π̂_T)
    teacher_used: torch.Tensor  # bool: teacher shaped this draw (β>0, SKD replacement, teacher)
    teacher_logprob: torch.Tensor  # log π̂_T(token): exact on the top-k, tail completion off it


class Behavior(Protocol):
    """What the rollout loop calls once per decode step for a batch of B prefixes."""

    name: str

    def needs_teacher(self, eps: float) -> bool: ...

    def sample(
        self,
        student_logits_B_V: torch.Tensor,
        topk: TeacherTopK | None,
        eps: float,
        generator: Generator,
    ) -> tuple[torch.Tensor, StepDiagnostics]: ...


def _student_logp(student_logits_B_V: torch.Tensor) -> torch.Tensor:
    dtype = torch.promote_types(student_logits_B_V.dtype, torch.float32)
    return student_logits_B_V.detach().to(dtype).log_softmax(-1)


def _reduced64(student_logp_B_V: torch.Tensor, topk: TeacherTopK) -> tuple[torch.Tensor, torch.Tensor]:
    # (k+1) categories are cheap, so diagnostics and the blend run in float64.
    # The floor matches the solver's, so β, the blend and the reported KL see the same numbers.
    s_red, t_red = reduce(student_logp_B_V, topk)
    return s_red.double().clamp_min(LOG_FLOOR), t_red.double().log_softmax(-1).clamp_min(LOG_FLOOR)


def _require(topk: TeacherTopK | None, who: str) -> TeacherTopK:
    if topk is None:
        raise ValueError(f"behavior {who!r} needs the teacher's top-k at this step")
    return topk


def _diagnostics(student_logp_B_V, topk, tokens_B, beta, kl_B, used) -> StepDiagnostics:
    n_rows, device = tokens_B.shape[0], tokens_B.device
    if topk is None:
        t_logprob_B = torch.full((n_rows,), math.nan, device=device)
    else:
        t_logprob_B = completed_logprob_of(student_logp_B_V, topk, tokens_B).float()

    def row(x, dtype=torch.float32):
        return torch.as_tensor(x, device=device).to(dtype).expand(n_rows)

    return StepDiagnostics(row(beta), row(kl_B), row(used, torch.bool), t_logprob_B)


def _sample_student(student_logits_B_V, topk, generator) -> tuple[torch.Tensor, StepDiagnostics]:
    s_logp = _student_logp(student_logits_B_V)
    tokens_B = sample_categorical(s_logp, generator)
    return tokens_B, _diagnostics(s_logp, topk, tokens_B, 0.0, 0.0, False)


@dataclass(frozen=True)
class OnPolicy:
    """Vanilla OPD: μ = π_S. Takes a top-k only to report the teacher log-prob of the draw."""

    name: ClassVar[str] = "opd"

    def needs_teacher(self, eps: float) -> bool:
        return False

    @torch.no_grad()
    def sample(self, student_logits_B_V, topk, eps, generator):
        return _sample_student(student_logits_B_V, topk, generator)


@dataclass(frozen=True)
class Blend:
    """μ_β* in the top-k form. `trb` and `fixed_eps` differ only in the ε the trainer passes."""

    name: str = "trb"
    tol: float = 1e-4

    def needs_teacher(self, eps: float) -> bool:
        return eps > 0

    @torch.no_grad()
    def sample(self, student_logits_B_V, topk, eps, generator):
        if eps <= 0:  # β* = 0: the pure student, no teacher call needed
            return _sample_student(student_logits_B_V, topk, generator)
        topk = _require(topk, self.name)
        s_logp = _student_logp(student_logits_B_V)
        s_red, t_red = _reduced64(s_logp, topk)
        beta_B = solve_beta(s_red, t_red, eps, tol=self.tol)
        mix_red = blend_logp(s_red, t_red, beta_B)
        tokens_B = sample_reduced(s_logp, topk.ids, mix_red, generator)
        return tokens_B, _diagnostics(s_logp, topk, tokens_B, beta_B, kl(mix_red, s_red), beta_B > 0)


@dataclass(frozen=True)
class Speculative:
    """SKD: the student proposes a ~ π_S; kept if a is in the teacher's top-`k_skd`, else replaced.

    The replacement is drawn from the teacher's top-k renormalised (not the completed teacher):
    a replaced token is then always one the teacher ranked, and the tail, which the completion
    fills with the student's own shape, is what SKD is meant to reject. Needs k_skd <= k.
    """

    k_skd: int = 25
    name: ClassVar[str] = "skd"

    def needs_teacher(self, eps: float) -> bool:
        return True

    @torch.no_grad()
    def sample(self, student_logits_B_V, topk, eps, generator):
        topk = _require(topk, self.name)
        if not 1 <= self.k_skd <= topk.ids.shape[-1]:
            raise ValueError(f"skd needs 1 <= k_skd <= k, got k_skd={self.k_skd}, k={topk.ids.shape[-1]}")
        s_logp = _student_logp(student_logits_B_V)
        proposal_B = sample_categorical(s_logp, generator)
        skd_cols_B_Ks = topk.logprobs.topk(self.k_skd, -1).indices
        accepted_B = (topk.ids.gather(-1, skd_cols_B_Ks) == proposal_B.unsqueeze(-1)).any(-1)
        pick_B = sample_categorical(topk.logprobs, generator)
        replacement_B = topk.ids.gather(-1, pick_B.unsqueeze(-1)).squeeze(-1)
        tokens_B = torch.where(accepted_B, proposal_B, replacement_B)
        kl_B = self._kl_to_student(s_logp, topk, skd_cols_B_Ks)
        return tokens_B, _diagnostics(s_logp, topk, tokens_B, math.nan, kl_B, ~accepted_B)

    @staticmethod
    def _kl_to_student(s_logp_B_V, topk, skd_cols_B_Ks) -> torch.Tensor:
        """KL(μ_skd || π_S), μ_skd = π_S·1[top-k_skd] + P(reject)·(top-k teacher renormalised)."""
        s_red, _ = _reduced64(s_logp_B_V, topk)  # (B, K+1)
        in_skd = torch.zeros_like(s_red, dtype=torch.bool).scatter(-1, skd_cols_B_Ks, True)
        keep_red = s_red.masked_fill(~in_skd, -math.inf)
        log_reject_B = log1mexp(keep_red.logsumexp(-1))
        no_tail = torch.full_like(s_red[:, :1], -math.inf)
        q_red = torch.cat([topk.logprobs.double().log_softmax(-1), no_tail], -1)
        mu_red = torch.logaddexp(keep_red, log_reject_B.unsqueeze(-1) + q_red)
        return kl(mu_red, s_red)


@dataclass(frozen=True)
class TeacherSample:
    """μ = π̂_T (the completed teacher): rollouts for the SFT warmup baseline."""

    name: ClassVar[str] = "teacher"

    def needs_teacher(self, eps: float) -> bool:
        return True

    @torch.no_grad()
    def sample(self, student_logits_B_V, topk, eps, generator):
        topk = _require(topk, self.name)
        s_logp = _student_logp(student_logits_B_V)
        s_red, t_red = _reduced64(s_logp, topk)
        tokens_B = sample_reduced(s_logp, topk.ids, t_red, generator)
        return tokens_B, _diagnostics(s_logp, topk, tokens_B, 1.0, kl(t_red, s_red), True)


BEHAVIORS = {
    "opd": OnPolicy,
    "trb": lambda **kw: Blend(name="trb", **kw),
    "fixed_eps": lambda **kw: Blend(name="fixed_eps", **kw),
    "skd": Speculative,
    "teacher": TeacherSample,
}


def make_behavior(name: str, **kwargs) -> Behavior:
    """The named behavior policy; kwargs go to its constructor (`tol` for blends, `k_skd` for skd)."""
    if name not in BEHAVIORS:
        raise ValueError(f"unknown behavior {name!r}; valid: {', '.join(BEHAVIORS)}")
    return BEHAVIORS[name](**kwargs)
