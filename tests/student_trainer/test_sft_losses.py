"""The SFT warmup's losses and the loss dispatch: obvious formulas, top-k exactness, token alignment."""

import math

import pytest
import torch

from student_trainer.methods.losses import distill_loss, loss_rows, next_tokens, per_token_loss, reverse_kl_loss
from student_trainer.methods.sft_warmup import cross_entropy_rows, forward_kl_rows
from student_trainer.methods.topk import TeacherTopK, complete_teacher

B, T, V, K = 3, 5, 12, 4


def make_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64).requires_grad_(True)
    teacher = torch.randn(B, T, V, generator=g, dtype=torch.float64).log_softmax(-1)
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [1, 1, 0, 0, 0]])
    return logits, teacher, tokens, mask


def test_cross_entropy_fits_the_token_after_each_loss_position():
    """Logit position p predicts column p+1 (rollout.py): the loss is −log π_S(tokens[p+1]) there."""
    logits, teacher, tokens, mask = make_batch()
    mask[:, -1] = 0  # the last column has no next token, so it is never a loss position
    loss, per_token = distill_loss(logits, teacher, mask, name="cross_entropy", tokens_B_T=tokens)
    logp = logits.log_softmax(-1)
    expected = [-logp[b, p, tokens[b, p + 1]] for b in range(B) for p in range(T) if mask[b, p]]
    assert torch.allclose(loss, torch.stack(expected).mean(), atol=1e-12)
    (grad,) = torch.autograd.grad(loss, logits)
    (ref_grad,) = torch.autograd.grad(torch.stack(expected).mean(), logits)
    assert torch.allclose(grad, ref_grad, atol=1e-12)
    assert (per_token[mask == 0] == 0).all()


def test_cross_entropy_needs_no_teacher_and_floors_an_impossible_token():
    logp = torch.tensor([[0.0, -math.inf]], requires_grad=True)
    value = cross_entropy_rows(logp, torch.tensor([1]))
    value.sum().backward()
    assert value.item() == 1e4 and torch.isfinite(logp.grad).all()
    assert torch.equal(loss_rows("cross_entropy", logp, None, torch.tensor([0])), torch.tensor([0.0]))
    with pytest.raises(ValueError, match="tokens"):
        loss_rows("cross_entropy", logp, None)


def test_next_tokens_shifts_left():
    assert next_tokens(torch.tensor([[5, 6, 7]])).tolist() == [[6, 7, 0]]


def test_forward_kl_equals_obvious_formula_and_topk_equals_completed_teacher():
    logits, teacher, _, mask = make_batch(seed=1)
    loss, _ = distill_loss(logits, teacher, mask, name="forward_kl")
    ref = (teacher.exp() * (teacher - logits.log_softmax(-1))).sum(-1)
    assert torch.allclose(loss, (ref * mask).sum() / mask.sum(), atol=1e-12)
    # top-k + tail: exact against the completed teacher, values and gradients
    s = logits.reshape(-1, V)
    lp, ids = teacher.reshape(-1, V).topk(K, -1)
    topk = TeacherTopK(ids, lp)
    got = forward_kl_rows(s.log_softmax(-1), topk)
    hat = complete_teacher(s.detach().log_softmax(-1), topk)
    full = (hat.exp() * (hat - s.log_softmax(-1))).sum(-1)
    (g_got,) = torch.autograd.grad(got.sum(), logits)
    (g_full,) = torch.autograd.grad(full.sum(), logits)
    assert torch.allclose(got, full, atol=1e-12) and torch.allclose(g_got, g_full, atol=1e-12)


def test_reverse_kl_through_the_dispatch_is_unchanged():
    logits, teacher, tokens, mask = make_batch(seed=2)
    a, _ = distill_loss(logits, teacher, mask, name="reverse_kl", tokens_B_T=tokens)
    b, _ = reverse_kl_loss(logits, teacher, mask)
    assert torch.equal(a, b)


def test_unknown_loss_and_missing_teacher_are_refused():
    logits, teacher, _, mask = make_batch()
    with pytest.raises(ValueError, match="unknown loss"):
        per_token_loss(logits, teacher, mask, "jsd")
    with pytest.raises(ValueError, match="teacher"):
        per_token_loss(logits, None, mask, "veto_forward", veto_beta=0.5)
