"""The masked token-mean reverse KL against the obvious formula, and its properties."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from student_trainer.methods.losses import per_token_reverse_kl, reverse_kl_loss
from student_trainer.methods.topk import TeacherTopK, complete_teacher

B, T, V, K = 3, 5, 12, 4


def make_batch(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=dtype).requires_grad_(True)
    teacher = torch.randn(B, T, V, generator=g, dtype=dtype).log_softmax(-1)
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [1, 1, 0, 0, 0]])
    return logits, teacher, mask


def obvious_loss(logits, teacher, mask):
    """Σ softmax·(log softmax − teacher) per position, masked mean over the batch."""
    per_token = (logits.softmax(-1) * (logits.log_softmax(-1) - teacher)).sum(-1)
    return (per_token * mask).sum() / mask.sum()


def test_loss_and_gradient_equal_obvious_formula():
    logits, teacher, mask = make_batch()
    loss, kl_B_T = reverse_kl_loss(logits, teacher, mask)
    (grad,) = torch.autograd.grad(loss, logits)
    ref = obvious_loss(logits, teacher, mask)
    (ref_grad,) = torch.autograd.grad(ref, logits)
    assert torch.allclose(loss, ref, atol=1e-12)
    assert torch.allclose(grad, ref_grad, atol=1e-12)
    assert (kl_B_T[mask == 0] == 0).all() and not kl_B_T.requires_grad


def test_topk_loss_equals_full_loss_under_completed_teacher():
    logits, teacher, mask = make_batch(seed=1)
    lp, ids = teacher.topk(K, -1)
    topk = TeacherTopK(ids, lp)  # (B, T, K)
    flat = TeacherTopK(ids.reshape(-1, K), lp.reshape(-1, K))
    hat = complete_teacher(logits.detach().log_softmax(-1).reshape(-1, V), flat).reshape(B, T, V)
    loss_topk, _ = reverse_kl_loss(logits, topk, mask)
    loss_full, _ = reverse_kl_loss(logits, hat, mask)
    assert torch.allclose(loss_topk, loss_full, atol=1e-10)


def test_topk_with_exact_tail_and_float16_logprobs():
    logits, teacher, mask = make_batch(seed=2, dtype=torch.float32)
    lp, ids = teacher.topk(K, -1)
    tail = torch.log1p(-lp.exp().sum(-1))
    loss_exact, _ = reverse_kl_loss(logits, TeacherTopK(ids, lp, tail), mask)
    loss_computed, _ = reverse_kl_loss(logits, TeacherTopK(ids, lp.half()), mask)
    assert torch.allclose(loss_exact, loss_computed, atol=1e-2)


def test_all_masked_batch_is_exactly_zero_with_zero_grad():
    logits, teacher, _ = make_batch()
    for target in (teacher, TeacherTopK(*reversed(teacher.topk(K, -1)))):
        logits.grad = None
        loss, kl_B_T = reverse_kl_loss(logits, target, torch.zeros(B, T))
        loss.backward()
        assert loss.item() == 0.0 and (kl_B_T == 0).all()
        assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_garbage_at_padding_does_not_leak():
    logits, teacher, mask = make_batch()
    dirty = teacher.masked_fill(mask[..., None] == 0, math.nan)
    loss, _ = reverse_kl_loss(logits, dirty, mask)
    loss.backward()
    assert torch.allclose(loss, obvious_loss(logits, teacher, mask))
    assert torch.isfinite(logits.grad).all()


def test_bfloat16_logits_are_computed_in_float32():
    logits, teacher, mask = make_batch(dtype=torch.float32)
    kl_B_T = per_token_reverse_kl(logits.detach().bfloat16(), teacher, mask)
    assert kl_B_T.dtype == torch.float32


def test_vocab_mismatch_raises():
    logits, teacher, mask = make_batch()
    try:
        reverse_kl_loss(logits, teacher[..., :-1], mask)
    except ValueError as e:
        assert "teacher" in str(e)
    else:
        raise AssertionError("expected ValueError")


finite_or_extreme = st.floats(-1e4, 1e4, allow_nan=False) | st.sampled_from([-1e30, -math.inf, 0.0, 80.0])
rows = st.lists(st.lists(finite_or_extreme, min_size=6, max_size=6).filter(lambda r: max(r) > -1e30),
                min_size=4, max_size=4)


def _as_batch(rows_):
    return torch.tensor(rows_, dtype=torch.float32).reshape(2, 2, 6)


@settings(max_examples=40, deadline=None)
@given(rows, rows, st.lists(st.booleans(), min_size=4, max_size=4))
def test_properties_for_random_and_extreme_logits(s_rows, t_rows, mask_bits):
    logits = _as_batch(s_rows).requires_grad_(True)
    teacher = _as_batch(t_rows).log_softmax(-1)
    mask = torch.tensor(mask_bits).reshape(2, 2)
    for target in (teacher, TeacherTopK(*reversed(teacher.topk(3, -1)))):
        logits.grad = None
        loss, kl_B_T = reverse_kl_loss(logits, target, mask)
        loss.backward()
        assert torch.isfinite(loss) and loss >= 0 and (kl_B_T >= 0).all()
        assert torch.isfinite(logits.grad).all()
        if not mask.any():
            assert loss.item() == 0.0
    same, _ = reverse_kl_loss(logits, logits.detach().log_softmax(-1), torch.ones(2, 2))
    assert same.item() == 0.0


def test_parts_with_the_global_token_count_add_up_to_the_whole_batch() -> None:
    """How micro-batches and ranks split a step: Σ part losses (÷ global count) = whole-batch loss."""
    logits, teacher, mask = make_batch()
    whole, _ = reverse_kl_loss(logits, teacher, mask)
    (whole_grad,) = torch.autograd.grad(whole, logits)
    n = mask.sum()
    parts = [reverse_kl_loss(logits[rows], teacher[rows], mask[rows], n_tokens=n)[0] for rows in ([0], [1, 2])]
    (parts_grad,) = torch.autograd.grad(sum(parts), logits)
    assert torch.allclose(sum(parts), whole, atol=1e-12)
    assert torch.allclose(parts_grad, whole_grad, atol=1e-12)
