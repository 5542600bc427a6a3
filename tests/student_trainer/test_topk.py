"""The (k+1)-category form equals the full-vocabulary computation under the completed teacher."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from student_trainer.methods.blend import blend_logp, kl, kl_to_student, solve_beta
from student_trainer.methods.topk import (
    TAIL_LOG_FLOOR,
    TeacherTopK,
    complete_teacher,
    completed_logprob_of,
    reduce,
    sample_reduced,
    student_tail,
    topk_reverse_kl,
)


def make_case(n=5, v=40, k=6, seed=0, dtype=torch.float64, exact_tail=False):
    g = torch.Generator().manual_seed(seed)
    s_logp = (1.5 * torch.randn(n, v, generator=g, dtype=dtype)).log_softmax(-1)
    t_logp = (1.5 * torch.randn(n, v, generator=g, dtype=dtype)).log_softmax(-1)
    lp, ids = t_logp.topk(k, -1)
    tail = torch.log1p(-lp.exp().sum(-1)) if exact_tail else None
    return s_logp, t_logp, TeacherTopK(ids, lp, tail)


def ref_complete(s_logp_V, ids_K, lp_K):
    """Slow reference: probabilities, a Python loop over the vocabulary."""
    p_s, in_s = s_logp_V.exp(), set(ids_K.tolist())
    t_tail = 1 - lp_K.exp().sum()
    s_tail = sum(p_s[a] for a in range(len(p_s)) if a not in in_s)
    out = [t_tail * p_s[a] / s_tail for a in range(len(p_s))]
    for a, lp in zip(ids_K.tolist(), lp_K, strict=True):
        out[a] = lp.exp()
    return torch.stack(out).log()


def test_complete_teacher_matches_reference_and_is_normalised():
    s_logp, _, topk = make_case()
    hat = complete_teacher(s_logp, topk)
    for i in range(len(s_logp)):
        assert torch.allclose(hat[i], ref_complete(s_logp[i], topk.ids[i], topk.logprobs[i]), atol=1e-12)
    assert torch.allclose(hat.logsumexp(-1), torch.zeros(5, dtype=torch.float64), atol=1e-12)


def test_reduced_vectors_are_normalised_partitions():
    s_logp, _, topk = make_case(exact_tail=True)
    s_red, t_red = reduce(s_logp, topk)
    assert s_red.shape == (5, 7)
    assert torch.allclose(s_red.logsumexp(-1), torch.zeros(5, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(t_red.logsumexp(-1), torch.zeros(5, dtype=torch.float64), atol=1e-12)


def test_computed_tail_equals_exact_tail():
    s_logp, _, topk = make_case(exact_tail=True)
    assert torch.allclose(TeacherTopK(topk.ids, topk.logprobs).tail(), topk.tail(), atol=1e-12)


def test_server_float_minimum_tail_is_floored():
    s_logp, _, topk = make_case()
    sent = TeacherTopK(topk.ids, topk.logprobs, torch.full((5,), torch.finfo(torch.float32).min))
    assert (sent.tail() == TAIL_LOG_FLOOR).all()
    assert torch.isfinite(topk_reverse_kl(s_logp, sent)).all()


def test_reduced_beta_and_kl_equal_full_vocabulary():
    s_logp, _, topk = make_case(seed=1)
    hat = complete_teacher(s_logp, topk)
    s_red, t_red = reduce(s_logp, topk)
    for eps in [1e-3, 0.05, 0.2, 10.0]:
        b_red, b_full = solve_beta(s_red, t_red, eps, tol=1e-9), solve_beta(s_logp, hat, eps, tol=1e-9)
        assert torch.allclose(b_red, b_full, atol=1e-6)
        assert torch.allclose(kl_to_student(s_red, t_red, b_red), kl_to_student(s_logp, hat, b_red), atol=1e-10)
    assert torch.allclose(topk_reverse_kl(s_logp, topk), kl(s_logp, hat), atol=1e-10)


def test_topk_kl_matches_formula_and_is_differentiable():
    _, _, topk = make_case(seed=2)
    logits = torch.randn(5, 40, dtype=torch.float64, requires_grad=True)
    s_logp = logits.log_softmax(-1)
    on_s = s_logp.gather(-1, topk.ids)
    s_tail = torch.log1p(-on_s.exp().sum(-1))
    formula = (on_s.exp() * (on_s - topk.logprobs)).sum(-1) + s_tail.exp() * (s_tail - topk.tail())
    assert torch.allclose(topk_reverse_kl(s_logp, topk), formula, atol=1e-12)
    (g_fast,) = torch.autograd.grad(topk_reverse_kl(s_logp, topk).sum(), logits, retain_graph=True)
    (g_ref,) = torch.autograd.grad(formula.sum(), logits)
    assert torch.allclose(g_fast, g_ref, atol=1e-10)


def test_topk_kl_lower_bounds_true_kl():
    s_logp, t_logp, topk = make_case(seed=3, exact_tail=True)
    assert (topk_reverse_kl(s_logp, topk) <= kl(s_logp, t_logp) + 1e-12).all()


def test_completed_logprob_of_tokens():
    s_logp, _, topk = make_case(seed=4)
    hat = complete_teacher(s_logp, topk)
    tokens = torch.tensor([0, 5, topk.ids[2, 0].item(), 39, topk.ids[4, 3].item()])
    expected = hat.gather(-1, tokens[:, None]).squeeze(-1)
    assert torch.allclose(completed_logprob_of(s_logp, topk, tokens), expected, atol=1e-12)


def chi_square(counts, probs):
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "drew a category of probability 0"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()), int(keep.sum()) - 1


def chi_square_threshold(dof, z=3.29):
    """Wilson-Hilferty upper quantile (z=3.29: about 0.9995)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def test_sample_reduced_frequencies_match_mu_including_tail():
    v, k, draws = 8, 3, 200_000
    g = torch.Generator().manual_seed(0)
    s_logp = torch.randn(1, v, generator=g, dtype=torch.float64).log_softmax(-1)
    t_logp = torch.randn(1, v, generator=g, dtype=torch.float64).log_softmax(-1)
    lp, ids = t_logp.topk(k, -1)
    topk = TeacherTopK(ids, lp)
    s_red, t_red = reduce(s_logp, topk)
    mix = blend_logp(s_red, t_red, torch.tensor([0.6], dtype=torch.float64))
    mu_full = blend_logp(s_logp, complete_teacher(s_logp, topk), torch.tensor([0.6], dtype=torch.float64))
    assert mix[0, -1].exp() > 0.2  # the tail path is exercised
    tokens = sample_reduced(s_logp.expand(draws, v), ids.expand(draws, k), mix.expand(draws, k + 1), g)
    stat, dof = chi_square(torch.bincount(tokens, minlength=v).double(), mu_full[0].exp())
    assert stat < chi_square_threshold(dof)
    wrong, _ = chi_square(torch.bincount(tokens, minlength=v).double(), s_logp[0].exp())
    assert wrong > 10 * chi_square_threshold(dof)  # the test has power


extreme = st.floats(-1e4, 1e4, allow_nan=False) | st.sampled_from([-1e30, -100.0, 0.0, 100.0])


@settings(max_examples=40, deadline=None)
@given(st.lists(extreme, min_size=6, max_size=6), st.lists(extreme, min_size=6, max_size=6))
def test_no_nan_for_extreme_logits(s_logits, t_logits):
    logits = torch.tensor([s_logits], dtype=torch.float32, requires_grad=True)
    s_logp = logits.log_softmax(-1)
    lp, ids = torch.tensor([t_logits]).log_softmax(-1).topk(3, -1)
    topk = TeacherTopK(ids, lp)
    loss = topk_reverse_kl(s_logp, topk)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and (loss > -1e-5).all()
    assert torch.isfinite(logits.grad).all()
    s_red, t_red = reduce(s_logp.detach(), topk)
    assert torch.isfinite(solve_beta(s_red, t_red, 0.1)).all()
    assert torch.isfinite(complete_teacher(s_logp.detach(), topk)).all()


def test_all_mass_on_topk_or_on_tail_is_finite():
    v = 10
    ids = torch.tensor([[0, 1, 2]])
    topk = TeacherTopK(ids, torch.tensor([[-0.1, -3.0, -4.0]]))
    on_s = torch.full((1, v), -200.0)
    on_s[0, :3] = 0.0
    on_tail = -on_s
    for logits in (on_s, on_tail, torch.full((1, v), -math.inf).index_fill(1, ids[0], 0.0)):
        logits = logits.clone().requires_grad_(True)
        s_logp = logits.log_softmax(-1)
        out = topk_reverse_kl(s_logp, topk)
        out.backward()
        assert torch.isfinite(out).all() and torch.isfinite(logits.grad).all()
        assert torch.isfinite(student_tail(s_logp, ids)).all()


def test_full_vocab_topk_has_floored_tail():
    s_logp, _, _ = make_case(n=2, v=5, k=5)
    lp, ids = s_logp.topk(5, -1)
    topk = TeacherTopK(ids, lp)
    assert (student_tail(s_logp, ids) == TAIL_LOG_FLOOR).all()
    assert topk_reverse_kl(s_logp, topk).abs().max() < 1e-12


def test_int32_ids_from_the_wire_are_accepted():
    s_logp, _, topk = make_case(seed=5)
    wire = TeacherTopK(topk.ids.int(), topk.logprobs.float())
    assert wire.ids.dtype == torch.long
    assert torch.allclose(topk_reverse_kl(s_logp, wire), topk_reverse_kl(s_logp, topk), atol=1e-6)
