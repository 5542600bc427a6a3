"""Behavior policies: sampled frequencies match their distributions; SKD accept/replace; plumbing."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from student_trainer.methods.behaviors import make_behavior
from student_trainer.methods.blend import blend_logp, kl, solve_beta
from student_trainer.methods.topk import TeacherTopK, complete_teacher

V, K, DRAWS = 8, 3, 200_000
NAMES = ["opd", "trb", "fixed_eps", "skd", "teacher"]


def one_row(seed=0):
    g = torch.Generator().manual_seed(seed)
    s_logits = torch.randn(1, V, generator=g)
    t_logp = (0.8 * torch.randn(1, V, generator=g)).log_softmax(-1)
    lp, ids = t_logp.topk(K, -1)
    return s_logits, TeacherTopK(ids, lp)


def repeat(s_logits, topk, n):
    return s_logits.expand(n, V), TeacherTopK(topk.ids.expand(n, K), topk.logprobs.expand(n, K))


def chi_square_ok(tokens, probs_V):
    counts = torch.bincount(tokens, minlength=V).double()
    expected = probs_V.double() * len(tokens)
    keep = expected > 1e-9
    assert counts[~keep].sum() == 0, "drew a token of probability 0"
    stat = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    dof = int(keep.sum()) - 1
    threshold = dof * (1 - 2 / (9 * dof) + 3.29 * math.sqrt(2 / (9 * dof))) ** 3  # ~0.9995 quantile
    return stat < threshold


def expected_mu(name, s_logits, topk, eps, k_skd=2):
    s_logp = s_logits.double().log_softmax(-1)
    topk64 = TeacherTopK(topk.ids, topk.logprobs.double())
    hat = complete_teacher(s_logp, topk64)
    if name == "opd":
        return s_logp[0].exp()
    if name == "teacher":
        return hat[0].exp()
    if name in ("trb", "fixed_eps"):
        return blend_logp(s_logp, hat, solve_beta(s_logp, hat, eps))[0].exp()
    p_s = s_logp[0].exp()  # skd: keep the proposal if in top-k_skd, else a top-k teacher draw
    top_skd = topk.ids[0, :k_skd]
    accept = torch.zeros(V, dtype=torch.float64).index_fill(0, top_skd, 1.0) * p_s
    q = torch.zeros(V, dtype=torch.float64).index_copy(0, topk.ids[0], topk64.logprobs[0].softmax(-1))
    return accept + (1 - accept.sum()) * q


@pytest.mark.parametrize("name", NAMES)
def test_sampled_frequencies_match_mu(name):
    s_logits, topk = one_row()
    eps = 0.15
    kwargs = {"k_skd": 2} if name == "skd" else {}
    behavior = make_behavior(name, **kwargs)
    mu = expected_mu(name, s_logits, topk, eps)
    hat_tail = complete_teacher(s_logits.double().log_softmax(-1), topk)[0].exp()
    if name in ("trb", "teacher"):  # the tail path is exercised: real mass off the top-k
        assert mu[~torch.isin(torch.arange(V), topk.ids[0])].sum() > 0.1 and hat_tail.sum() > 0
    g = torch.Generator().manual_seed(123)
    tokens, diag = behavior.sample(*repeat(s_logits, topk, DRAWS), eps, g)
    assert chi_square_ok(tokens, mu)
    p_s = s_logits[0].double().softmax(-1)
    realised = torch.where(mu > 0, mu * (mu / p_s).log(), 0.0).sum()  # KL(μ || π_S) by hand
    assert diag.kl_to_student[0].item() == pytest.approx(realised.item(), abs=1e-5)
    assert diag.beta.shape == diag.kl_to_student.shape == diag.teacher_logprob.shape == (DRAWS,)
    if name != "opd":  # the tests would catch a student-only sampler
        assert not chi_square_ok(tokens, s_logits[0].softmax(-1))


def test_trb_diagnostics_match_full_vocabulary():
    s_logits, topk = one_row(seed=1)
    eps = 0.05
    _, diag = make_behavior("trb").sample(s_logits, topk, eps, torch.Generator().manual_seed(0))
    s_logp = s_logits.double().log_softmax(-1)
    hat = complete_teacher(s_logp, TeacherTopK(topk.ids, topk.logprobs.double()))
    beta = solve_beta(s_logp, hat, eps)
    assert diag.beta.item() == pytest.approx(beta.item(), abs=1e-6)
    assert diag.kl_to_student.item() <= eps + 1e-6
    assert diag.kl_to_student.item() == pytest.approx(kl(blend_logp(s_logp, hat, beta), s_logp).item(), abs=1e-6)
    assert diag.teacher_used.item() and 0 < diag.beta.item() < 1


def test_skd_keeps_student_token_in_teacher_top_k_skd():
    topk = TeacherTopK(torch.tensor([[5, 2, 7]]), torch.log(torch.tensor([[0.5, 0.3, 0.1]])))
    skd = make_behavior("skd", k_skd=2)
    g = torch.Generator().manual_seed(0)
    for token in (5, 2):  # the student is certain of a token the teacher ranks in its top-2
        logits = torch.full((64, V), -1e9).index_fill(1, torch.tensor([token]), 0.0)
        tokens, diag = skd.sample(logits, TeacherTopK(topk.ids.expand(64, 3), topk.logprobs.expand(64, 3)), 0.0, g)
        assert (tokens == token).all() and not diag.teacher_used.any()
        assert diag.kl_to_student.abs().max() < 1e-6
    for token in (7, 0):  # ranked 3rd (outside top-2), or outside the top-k: replaced by a teacher id
        logits = torch.full((256, V), -1e9).index_fill(1, torch.tensor([token]), 0.0)
        tokens, diag = skd.sample(logits, TeacherTopK(topk.ids.expand(256, 3), topk.logprobs.expand(256, 3)), 0.0, g)
        assert torch.isin(tokens, topk.ids[0]).all() and diag.teacher_used.all()
        assert set(tokens.tolist()) == {5, 2, 7}
        assert torch.isfinite(diag.teacher_logprob).all()


def test_skd_rejects_k_skd_above_k():
    s_logits, topk = one_row()
    with pytest.raises(ValueError, match="k_skd"):
        make_behavior("skd", k_skd=K + 1).sample(s_logits, topk, 0.0, torch.Generator())


def test_needs_teacher():
    assert not make_behavior("opd").needs_teacher(0.3)
    for name in ("trb", "fixed_eps"):
        assert make_behavior(name).needs_teacher(0.1) and not make_behavior(name).needs_teacher(0.0)
    assert make_behavior("skd").needs_teacher(0.0) and make_behavior("teacher").needs_teacher(0.0)


def test_zero_budget_needs_no_teacher_and_missing_teacher_raises():
    s_logits, topk = one_row()
    g = torch.Generator().manual_seed(0)
    tokens, diag = make_behavior("trb").sample(s_logits, None, 0.0, g)
    assert tokens.shape == (1,) and diag.beta.item() == 0 and diag.teacher_logprob.isnan().all()
    for name in ("trb", "skd", "teacher"):
        with pytest.raises(ValueError, match="top-k"):
            make_behavior(name).sample(s_logits, None, 0.1, g)


def test_make_behavior_rejects_unknown_names():
    with pytest.raises(ValueError, match="'trbb'.*opd, trb, fixed_eps, skd, teacher"):
        make_behavior("trbb")


def test_same_seed_same_tokens():
    s_logits, topk = one_row()
    args = repeat(s_logits, topk, 100)
    a, _ = make_behavior("trb").sample(*args, 0.1, torch.Generator().manual_seed(7))
    b, _ = make_behavior("trb").sample(*args, 0.1, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


extreme = st.floats(-1e4, 1e4, allow_nan=False) | st.sampled_from([-1e30, -100.0, 0.0, 100.0])


@settings(max_examples=25, deadline=None)
@given(st.lists(extreme, min_size=V, max_size=V), st.lists(extreme, min_size=V, max_size=V), st.floats(0, 1))
def test_no_nan_for_extreme_logits(s_row, t_row, eps):
    s_logits = torch.tensor([s_row])
    lp, ids = torch.tensor([t_row]).log_softmax(-1).topk(K, -1)
    topk = TeacherTopK(ids, lp)
    for name in NAMES:
        behavior = make_behavior(name, k_skd=2) if name == "skd" else make_behavior(name)
        tokens, diag = behavior.sample(s_logits, topk, eps, torch.Generator().manual_seed(0))
        assert 0 <= tokens.item() < V
        assert torch.isfinite(diag.kl_to_student).all() and torch.isfinite(diag.teacher_logprob).all()
        if name in ("trb", "fixed_eps"):
            assert 0 <= diag.beta.item() <= 1 and diag.kl_to_student.item() <= eps + 1e-6
