"""The β solver against a brute-force grid, and the blend / KL helpers against plain formulas."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from student_trainer.methods.blend import blend_logp, kl, kl_to_student, solve_beta

GRID_N = 4001  # β step 2.5e-4


def ref_beta(student_logp_C, teacher_logp_C, eps):
    """Largest grid β whose blend (computed the obvious way, in probabilities) is within ε."""
    ps, pt = student_logp_C.exp(), teacher_logp_C.exp()
    betas_G = torch.linspace(0, 1, GRID_N, dtype=torch.float64)
    mu_G_C = ps ** (1 - betas_G[:, None]) * pt ** betas_G[:, None]
    mu_G_C = mu_G_C / mu_G_C.sum(-1, keepdim=True)
    kl_G = torch.where(mu_G_C > 0, mu_G_C * (mu_G_C.log() - student_logp_C), 0.0).sum(-1)
    return float(betas_G[kl_G <= eps].max())


def random_pair(n, c, scale, seed):
    g = torch.Generator().manual_seed(seed)
    s = (scale * torch.randn(n, c, generator=g, dtype=torch.float64)).log_softmax(-1)
    t = (scale * torch.randn(n, c, generator=g, dtype=torch.float64)).log_softmax(-1)
    return s, t


@pytest.mark.parametrize("eps", [1e-3, 0.05, 0.3])
def test_solver_matches_brute_force_grid(eps):
    s, t = random_pair(6, 7, 2.0, seed=int(eps * 1e4))
    beta = solve_beta(s, t, eps)
    for i in range(len(s)):
        assert abs(float(beta[i]) - ref_beta(s[i], t[i], eps)) < 1e-3
    assert (kl_to_student(s, t, beta) <= eps + 1e-6).all()


def test_beta_one_when_teacher_inside_ball():
    s, t = random_pair(5, 6, 0.3, seed=1)
    eps = kl(t, s).max().item() + 1e-3
    assert torch.equal(solve_beta(s, t, eps), torch.ones(5, dtype=torch.float64))


def test_eps_zero_gives_exactly_zero():
    s, t = random_pair(5, 6, 1.0, seed=2)
    assert torch.equal(solve_beta(s, t, 0.0), torch.zeros(5, dtype=torch.float64))
    assert torch.equal(solve_beta(s, s, 0.0), torch.zeros(5, dtype=torch.float64))


def test_identical_rows_take_the_teacher():
    s, _ = random_pair(4, 9, 1.0, seed=3)
    assert torch.equal(solve_beta(s, s.clone(), 0.01), torch.ones(4, dtype=torch.float64))


def test_per_row_eps_and_mixed_rows():
    s, t = random_pair(3, 8, 2.0, seed=4)
    t[1] = s[1]
    eps = torch.tensor([0.0, 0.1, 0.02], dtype=torch.float64)
    beta = solve_beta(s, t, eps)
    assert beta[0] == 0 and beta[1] == 1
    assert abs(float(beta[2]) - ref_beta(s[2], t[2], 0.02)) < 1e-3


def test_float32_full_vocab_agrees_with_float64():
    s, t = random_pair(3, 5000, 1.0, seed=5)
    b32 = solve_beta(s.float(), t.float(), 0.05)
    assert b32.dtype == torch.float32
    assert torch.allclose(b32.double(), solve_beta(s, t, 0.05), atol=1e-3)


def test_blend_endpoints_and_kl_identity():
    s, t = random_pair(4, 10, 1.5, seed=6)
    assert torch.allclose(blend_logp(s, t, torch.zeros(4, dtype=torch.float64)), s)
    assert torch.allclose(blend_logp(s, t, torch.ones(4, dtype=torch.float64)), t)
    beta = torch.full((4,), 0.37, dtype=torch.float64)
    mu, r = blend_logp(s, t, beta), t - s  # KL(μ_β||π_S) = β E_μ[r] − log E_πS[e^{βr}]
    closed = beta * (mu.exp() * r).sum(-1) - (s + beta[:, None] * r).logsumexp(-1)
    assert torch.allclose(kl_to_student(s, t, beta), closed, atol=1e-12)


def test_kl_derivative_is_beta_times_variance():
    s, t = random_pair(3, 10, 1.5, seed=7)
    beta, h = torch.full((3,), 0.4, dtype=torch.float64), 1e-6
    numeric = (kl_to_student(s, t, beta + h) - kl_to_student(s, t, beta - h)) / (2 * h)
    mu, r = blend_logp(s, t, beta).exp(), t - s
    var = (mu * r**2).sum(-1) - (mu * r).sum(-1) ** 2
    assert torch.allclose(numeric, beta * var, atol=1e-6)


def test_kl_handles_zero_probabilities_without_nan_grad():
    logp = torch.tensor([0.0, -math.inf], requires_grad=True)
    logq = torch.tensor([-0.5, -math.inf])
    out = kl(logp, logq)
    out.backward()
    assert out.item() == pytest.approx(0.5) and torch.isfinite(logp.grad).all()


logits_rows = st.lists(
    st.lists(st.floats(-1e4, 1e4, allow_nan=False) | st.sampled_from([-1e30, 0.0, 50.0]), min_size=5, max_size=5),
    min_size=2,
    max_size=2,
)


@settings(max_examples=40, deadline=None)
@given(logits_rows, logits_rows, st.floats(0.0, 2.0))
def test_beta_in_unit_interval_monotone_never_over_budget(s_rows, t_rows, eps):
    s = torch.tensor(s_rows, dtype=torch.float32).log_softmax(-1)
    t = torch.tensor(t_rows, dtype=torch.float32).log_softmax(-1)
    b_lo, b_hi = solve_beta(s, t, eps), solve_beta(s, t, eps * 1.5 + 1e-3)
    assert torch.isfinite(b_lo).all() and ((b_lo >= 0) & (b_lo <= 1)).all()
    assert (b_hi >= b_lo).all()
    assert (kl_to_student(s.double(), t.double(), b_lo.double()) <= eps + 1e-6).all()
