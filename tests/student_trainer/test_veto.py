"""Veto's loss against a slow reference (values and gradients), full vocabulary and top-k + tail."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from student_trainer.methods.blend import kl
from student_trainer.methods.losses import LOSSES, per_token_loss
from student_trainer.methods.schedules import veto_beta
from student_trainer.methods.sft_warmup import forward_kl_rows
from student_trainer.methods.topk import TeacherTopK, complete_teacher, log1mexp, topk_reverse_kl
from student_trainer.methods.veto import veto_loss_rows, veto_target

N, V, K = 4, 30, 5


def make_case(seed=0, exact_tail=True, k=K):
    g = torch.Generator().manual_seed(seed)
    logits = (1.5 * torch.randn(N, V, generator=g, dtype=torch.float64)).requires_grad_(True)
    t_logp = (1.5 * torch.randn(N, V, generator=g, dtype=torch.float64)).log_softmax(-1)
    lp, ids = t_logp.topk(k, -1)
    tail = log1mexp(lp.logsumexp(-1)) if exact_tail else None  # -inf at k = V: floored by .tail()
    return logits, t_logp, TeacherTopK(ids, lp, tail)


def ref_veto(logits_V, teacher_p_V, beta, divergence):
    """One row, probabilities and a Python loop: q ∝ π_T·sg[π_S]^β, then the KL."""
    p_s = logits_V.softmax(-1)
    frozen = p_s.detach()
    weights = [teacher_p_V[a] * frozen[a] ** beta for a in range(len(p_s))]
    z = sum(weights)
    q = [w / z for w in weights]
    if divergence == "forward":
        return sum(q[a] * (q[a].log() - p_s[a].log()) for a in range(len(p_s)) if q[a] > 0)
    return sum(p_s[a] * (p_s[a].log() - q[a].log()) for a in range(len(p_s)))


def ref_completed_p(logits_V, ids_K, lp_K, tail):
    """π̂_T as probabilities: π_T on the top-k, T_tail·π_S/S_tail off it (from the frozen student)."""
    p_s, top = logits_V.detach().softmax(-1), set(ids_K.tolist())
    s_tail = sum(p_s[a] for a in range(len(p_s)) if a not in top)
    out = [tail.exp() * p_s[a] / s_tail for a in range(len(p_s))]
    for a, lp in zip(ids_K.tolist(), lp_K, strict=True):
        out[a] = lp.exp()
    return torch.stack(out)


def _value_and_grad(fn, logits):
    logits.grad = None
    value = fn(logits)
    (grad,) = torch.autograd.grad(value.sum(), logits)
    return value.detach(), grad


@pytest.mark.parametrize("divergence", ["forward", "reverse"])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.2, 20.0])
def test_full_vocabulary_equals_reference(divergence, beta):
    logits, t_logp, _ = make_case()
    got, got_grad = _value_and_grad(lambda x: veto_loss_rows(x.log_softmax(-1), t_logp, beta, divergence), logits)
    ref, ref_grad = _value_and_grad(
        lambda x: torch.stack([ref_veto(x[i], t_logp[i].exp(), beta, divergence) for i in range(N)]), logits)
    assert torch.allclose(got, ref, atol=1e-10)
    assert torch.allclose(got_grad, ref_grad, atol=1e-10)


@pytest.mark.parametrize("divergence", ["forward", "reverse"])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.2, 20.0])
def test_topk_form_equals_reference_under_completed_teacher(divergence, beta):
    logits, _, topk = make_case(seed=1)
    got, got_grad = _value_and_grad(lambda x: veto_loss_rows(x.log_softmax(-1), topk, beta, divergence), logits)
    ref, ref_grad = _value_and_grad(lambda x: torch.stack([
        ref_veto(x[i], ref_completed_p(x[i], topk.ids[i], topk.logprobs[i], topk.tail()[i]), beta, divergence)
        for i in range(N)]), logits)
    assert torch.allclose(got, ref, atol=1e-10)
    assert torch.allclose(got_grad, ref_grad, atol=1e-10)
    # and the fast full form against the fast completion agrees too
    full = veto_loss_rows(logits.log_softmax(-1), complete_teacher(logits.detach().log_softmax(-1), topk), beta,
                          divergence)
    assert torch.allclose(got, full.detach(), atol=1e-10)


def test_forward_gradient_is_student_minus_target():
    """∂ KL(q ‖ π_S) / ∂ logits = π_S − q: a token the student gives ~0 gets ~0 push (the veto)."""
    logits, t_logp, _ = make_case(seed=2)
    _, grad = _value_and_grad(lambda x: veto_loss_rows(x.log_softmax(-1), t_logp, 0.8, "forward"), logits)
    q = veto_target(logits.log_softmax(-1), t_logp, 0.8).exp()
    assert torch.allclose(grad, logits.detach().softmax(-1) - q, atol=1e-12)


def test_beta_zero_is_the_plain_teacher_target():
    logits, t_logp, topk = make_case(seed=3)
    s = logits.log_softmax(-1)
    assert torch.allclose(veto_loss_rows(s, t_logp, 0.0, "reverse"), kl(s, t_logp), atol=1e-12)
    assert torch.allclose(veto_loss_rows(s, t_logp, 0.0, "forward"), kl(t_logp, s), atol=1e-12)
    assert torch.allclose(veto_loss_rows(s, topk, 0.0, "reverse"), topk_reverse_kl(s, topk), atol=1e-12)
    assert torch.allclose(veto_loss_rows(s, topk, 0.0, "forward"), forward_kl_rows(s, topk), atol=1e-12)


@pytest.mark.parametrize("divergence", ["forward", "reverse"])
def test_large_beta_target_is_the_students_mode_and_stays_finite(divergence):
    logits, t_logp, topk = make_case(seed=4)
    mode = torch.tensor([3, 7, 0, 29])
    with torch.no_grad():
        logits[torch.arange(N), mode] = logits.max(-1).values + 1.0  # a clear mode: β·gap swamps the teacher
    q = veto_target(logits.log_softmax(-1), t_logp, 1e3).exp()
    assert torch.equal(q.argmax(-1), mode) and (q.max(-1).values > 0.999).all()
    for teacher in (t_logp, topk):
        value, grad = _value_and_grad(lambda x, t=teacher: veto_loss_rows(x.log_softmax(-1), t, 1e3, divergence),
                                      logits)
        assert torch.isfinite(value).all() and torch.isfinite(grad).all() and (value >= -1e-12).all()


def test_negative_beta_and_unknown_divergence_are_refused():
    logits, t_logp, topk = make_case()
    with pytest.raises(ValueError, match="beta"):
        veto_loss_rows(logits.log_softmax(-1), t_logp, -0.1)
    for teacher in (t_logp, topk):
        with pytest.raises(ValueError, match="divergence"):
            veto_loss_rows(logits.log_softmax(-1), teacher, 0.5, "jsd")


@pytest.mark.parametrize("divergence", ["forward", "reverse"])
def test_teacher_minus_inf_is_finite(divergence):
    """A teacher -inf (masked vocabulary; k above the teacher's support) gives finite values and gradients."""
    logits, t_logp, _ = make_case(seed=5)
    t_masked = t_logp.clone()
    t_masked[:, :3] = -math.inf
    t_masked = t_masked.log_softmax(-1)
    lp, ids = t_masked.topk(V - 1, -1)  # k above the support: the top-k holds -inf entries
    for teacher in (t_masked, TeacherTopK(ids, lp)):
        value, grad = _value_and_grad(lambda x, t=teacher: veto_loss_rows(x.log_softmax(-1), t, 0.8, divergence),
                                      logits)
        assert torch.isfinite(value).all() and torch.isfinite(grad).all()
    if divergence == "forward":  # no target mass there, so the reference is finite too
        ref = torch.stack([ref_veto(logits[i], t_masked[i].exp(), 0.8, "forward") for i in range(N)])
        assert torch.allclose(veto_loss_rows(logits.log_softmax(-1), t_masked, 0.8), ref, atol=1e-10)


@pytest.mark.parametrize("divergence", ["forward", "reverse"])
def test_k_equal_to_vocabulary_is_the_full_form(divergence):
    logits, t_logp, topk = make_case(seed=6, k=V)
    s = logits.log_softmax(-1)
    got, got_grad = _value_and_grad(lambda x: veto_loss_rows(x.log_softmax(-1), topk, 0.8, divergence), logits)
    full, full_grad = _value_and_grad(lambda x: veto_loss_rows(x.log_softmax(-1), t_logp, 0.8, divergence), logits)
    assert torch.allclose(got, full, atol=1e-10) and torch.allclose(got_grad, full_grad, atol=1e-10)
    assert torch.isfinite(veto_loss_rows(s, TeacherTopK(topk.ids, topk.logprobs), 0.8, divergence)).all()


def test_beta_schedule_decays_linearly_to_zero_over_the_run():
    assert [veto_beta("linear", k, 0.8, 4) for k in range(6)] == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.0, 0.0])
    assert veto_beta("constant", 3, 0.8, 4) == 0.8
    with pytest.raises(ValueError):
        veto_beta("cosine", 0, 0.8, 4)


finite_or_extreme = st.floats(-1e4, 1e4, allow_nan=False) | st.sampled_from([-1e30, -math.inf, 0.0, 80.0])
rows = st.lists(st.lists(finite_or_extreme, min_size=6, max_size=6).filter(lambda r: max(r) > -1e30),
                min_size=4, max_size=4)


@settings(max_examples=30, deadline=None)
@given(rows, rows, st.sampled_from([0.0, 0.5, 3.0]))
def test_every_loss_is_finite_and_nonnegative_for_extreme_logits(s_rows, t_rows, beta):
    logits = torch.tensor(s_rows, dtype=torch.float32).reshape(2, 2, 6).requires_grad_(True)
    teacher = torch.tensor(t_rows, dtype=torch.float32).reshape(2, 2, 6).log_softmax(-1)
    tokens = torch.tensor([[1, 5], [0, 3]])
    for name in LOSSES:
        for target in (teacher, TeacherTopK(*reversed(teacher.topk(3, -1)))):
            logits.grad = None
            loss = per_token_loss(logits, target, torch.ones(2, 2), name, tokens, beta)
            loss.sum().backward()
            assert torch.isfinite(loss).all() and (loss >= 0).all(), name
            assert torch.isfinite(logits.grad).all(), name
