"""Geometric blending of student and teacher, and the β that keeps the blend inside the KL ball.

TRB samples from `μ_β ∝ π_S^(1−β) · π_T^β` with the largest β in [0, 1] such that
`KL(μ_β || π_S) <= ε` (docs/method.md §3). Everything here works on log-probability vectors
along the last dimension, so the same code serves the full vocabulary and the (k+1)-category
top-k form of §5.
"""

from __future__ import annotations

import math

import torch

# Finite stand-in for log 0. With -inf, `(1−β)·log π_S + β·log π_T` meets 0·∞ at β ∈ {0, 1}
# and ∞−∞ in `log π_T − log π_S`; -1e4 is still exp-underflow zero in every float type.
LOG_FLOOR = -1.0e4

# Below this many categories the solver runs in float64: cheap, and it keeps tiny budgets exact.
FLOAT64_MAX_CATEGORIES = 4096


def blend_logp(
    student_logp_N_C: torch.Tensor, teacher_logp_N_C: torch.Tensor, beta_N: torch.Tensor
) -> torch.Tensor:
    """Log-probs of μ_β ∝ π_S^(1−β) π_T^β, one β per row; β=0 gives π_S and β=1 gives π_T."""
    s = student_logp_N_C.clamp_min(LOG_FLOOR)
    t = teacher_logp_N_C.clamp_min(LOG_FLOOR)
    mixed_N_C = s + beta_N.to(s.dtype).unsqueeze(-1) * (t - s)
    return mixed_N_C - mixed_N_C.logsumexp(-1, keepdim=True)


def kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) along the last dim, with 0·log 0 = 0 (and a gradient free of 0·∞ NaNs)."""
    p = logp.exp()
    diff = torch.where(p > 0, logp - logq, torch.zeros_like(logp))
    return (p * diff).sum(-1)


def kl_to_student(
    student_logp_N_C: torch.Tensor, teacher_logp_N_C: torch.Tensor, beta_N: torch.Tensor
) -> torch.Tensor:
    """KL(μ_β || π_S) per row: the quantity the trust region bounds."""
    mix_N_C = blend_logp(student_logp_N_C, teacher_logp_N_C, beta_N)
    return kl(mix_N_C, student_logp_N_C.clamp_min(LOG_FLOOR))


def _kl_closed_form(s_N_C: torch.Tensor, r_N_C: torch.Tensor, beta_N: torch.Tensor) -> torch.Tensor:
    # KL(μ_β || π_S) = β·E_μβ[r] − log E_πS[e^{βr}] with r = log π_T − log π_S:
    # half the passes of `kl`, which matters inside the solver's loop. Broadcasts: (N, 1, C) with (N, G) β.
    mixed_N_C = s_N_C + beta_N.unsqueeze(-1) * r_N_C
    log_z_N = mixed_N_C.logsumexp(-1)
    mu_N_C = (mixed_N_C - log_z_N.unsqueeze(-1)).exp()
    return beta_N * (mu_N_C * r_N_C).sum(-1) - log_z_N


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if x.shape[-1] <= FLOAT64_MAX_CATEGORIES:
        return torch.float64
    return torch.promote_types(x.dtype, torch.float32)


def _pass_bits(bits: int, categories: int) -> list[int]:
    # How many bits of β each pass settles: 4 (15 candidates at once) on the small top-k form, where
    # a pass costs its op dispatches more than its arithmetic; 1 (plain bisection) on a full
    # vocabulary, where 15 candidates would mean 15 copies of the (N, V) logits.
    step = 4 if categories <= FLOAT64_MAX_CATEGORIES else 1
    return [min(step, bits - done) for done in range(0, bits, step)]


@torch.no_grad()
def solve_beta(
    student_logp_N_C: torch.Tensor,
    teacher_logp_N_C: torch.Tensor,
    eps: float | torch.Tensor,
    tol: float = 1e-4,
) -> torch.Tensor:
    """Largest β in [0, 1] with KL(μ_β || π_S) <= ε, per row, on the grid of step 2^-⌈log2(1/tol)⌉.

    KL(μ_β || π_S) is nondecreasing in β (its derivative is β·Var_μβ[log π_T − log π_S]), so the
    answer is the last feasible point of the grid, which is where bisection ends too. Each pass
    tests 15 evenly spaced candidates above the current lower end at once and keeps the last one
    of the leading run of feasible ones: 4 passes instead of 14 bisection steps for tol=1e-4, the
    same grid point, and never a point over budget (up to the rounding of the KL evaluation).
    β=1 when the teacher is already inside the ball; ε <= 0 gives β=0 exactly, so the rollout is
    the pure student. Inputs are log-probs (renormalised here, so unnormalised logits also work).
    Returns (N,) in float32 or wider.

    Args:
        student_logp_N_C: log π_S over C categories (full vocabulary or the k+1 top-k form).
        teacher_logp_N_C: log π_T over the same categories.
        eps: budget ε, a float or a per-row (N,) tensor.
        tol: the grid step is the largest power of two not above it.
    """
    dtype = _compute_dtype(student_logp_N_C)
    s = student_logp_N_C.to(dtype).log_softmax(-1).clamp_min(LOG_FLOOR)  # (N, C)
    t = teacher_logp_N_C.to(dtype).log_softmax(-1).clamp_min(LOG_FLOOR)  # (N, C)
    n_rows = s.shape[0]
    eps_N = torch.as_tensor(eps, dtype=dtype, device=s.device).expand(n_rows)

    r_N_1_C = (t - s).unsqueeze(1)
    s_N_1_C = s.unsqueeze(1)
    lo_N = torch.zeros(n_rows, dtype=dtype, device=s.device)
    width = 1.0
    for bits in _pass_bits(max(1, math.ceil(math.log2(1.0 / tol))), s.shape[-1]):
        width /= 2**bits
        steps_G = torch.arange(1, 2**bits, dtype=dtype, device=s.device)
        beta_N_G = lo_N.unsqueeze(-1) + width * steps_G
        feasible_N_G = _kl_closed_form(s_N_1_C, r_N_1_C, beta_N_G) <= eps_N.unsqueeze(-1)
        lo_N = lo_N + width * feasible_N_G.cumprod(-1).sum(-1)

    teacher_inside_N = kl(t, s) <= eps_N
    beta_N = torch.where(teacher_inside_N, torch.ones_like(lo_N), lo_N)
    beta_N = torch.where(eps_N <= 0, torch.zeros_like(beta_N), beta_N)
    return beta_N.to(torch.promote_types(student_logp_N_C.dtype, torch.float32))
