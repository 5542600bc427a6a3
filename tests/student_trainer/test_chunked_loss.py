"""The chunked lm_head + top-k KL against the plain full-logits loss: values and gradients to 1e-5."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from conftest import REPO
from decoders.kv_decode import position_ids
from student_trainer.methods.losses import loss_rows, per_token_reverse_kl, reverse_kl_loss
from student_trainer.methods.topk import TeacherTopK
from student_trainer.training.chunked_loss import chunk_tokens, chunked_loss_sum
from student_trainer.training.student_model import StudentLoss, hidden_path_matches

STUDENT = REPO / "models" / "arith-student"


def _targets(n: int, vocab: int, k: int, seed: int) -> TeacherTopK:
    g = torch.Generator().manual_seed(seed)
    logp = (3 * torch.randn(n, vocab, generator=g, dtype=torch.float64)).log_softmax(-1)
    lps, ids = logp.topk(k, -1)
    tail = torch.log1p(-lps.exp().sum(-1).clamp_max(1 - 1e-12))
    return TeacherTopK(ids, lps.float(), tail.float())


def _plain_and_chunked(n: int, hidden: int, vocab: int, k: int, chunk: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(vocab, hidden, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(vocab, generator=g, dtype=torch.float64).requires_grad_()
    targets = _targets(n, vocab, k, seed)
    plain = per_token_reverse_kl((h @ w.T + b)[None], TeacherTopK(targets.ids[None], targets.logprobs[None],
                                                                  targets.tail_logprob[None]),
                                 torch.ones(1, n, dtype=torch.bool)).sum()
    plain_grads = torch.autograd.grad(plain, (h, w, b))
    chunked = chunked_loss_sum(h, w, b, targets, chunk)
    chunked_grads = torch.autograd.grad(chunked, (h, w, b))
    return plain, plain_grads, chunked, chunked_grads


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), vocab=st.integers(2, 60), chunk=st.integers(1, 50), seed=st.integers(0, 10_000),
       k_frac=st.floats(0.0, 1.0))
def test_chunked_equals_plain_values_and_gradients(n: int, vocab: int, chunk: int, seed: int, k_frac: float) -> None:
    k = max(1, round(k_frac * vocab))  # k = V included: the tail is then the floor on both sides
    plain, plain_grads, chunked, chunked_grads = _plain_and_chunked(n, 8, vocab, k, chunk, seed)
    assert float(chunked) == pytest.approx(float(plain), rel=1e-5, abs=1e-5)
    for a, b in zip(plain_grads, chunked_grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_a_minus_inf_teacher_entry_stays_finite_when_chunked() -> None:
    targets = _targets(6, 12, 4, 0)
    lps = targets.logprobs.clone()
    lps[:, -1] = -torch.inf  # k above the teacher's support
    h, w = torch.randn(6, 8, requires_grad=True), torch.randn(12, 8, requires_grad=True)
    loss = chunked_loss_sum(h, w, None, TeacherTopK(targets.ids, lps, targets.tail_logprob), chunk=4)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()


def test_chunk_size_follows_the_vocabulary() -> None:
    assert chunk_tokens(151_936) == 220  # about 128 MiB of float32 logits a chunk at Qwen3's vocabulary
    assert chunk_tokens(79) > 100_000  # the task vocabulary: one chunk, nothing recomputed
    assert chunk_tokens(10**9) == 1


def _batch(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (3, 14), generator=g)
    attention = torch.ones_like(ids)
    attention[0, :3] = 0  # left padding
    attention[2, -4:] = 0  # a shorter response
    loss_mask = attention.bool().clone()
    loss_mask[:, :6] = False
    loss_mask[2, -5:] = False
    t = _targets(3 * 14, vocab, 5, seed)
    return ids, attention, loss_mask, TeacherTopK(t.ids.view(3, 14, 5), t.logprobs.view(3, 14, 5),
                                                  t.tail_logprob.view(3, 14))


def test_student_loss_chunked_equals_full_logits_on_the_shipped_student() -> None:
    lm = AutoModelForCausalLM.from_pretrained(STUDENT)
    assert hidden_path_matches(lm)
    ids, attention, loss_mask, targets = _batch(lm.config.vocab_size)
    n_tokens = float(loss_mask.sum()) * 2  # this batch as half of a larger one
    args = (ids, attention, loss_mask, targets.ids, targets.logprobs, targets.tail_logprob, n_tokens)
    results = []
    for chunk in (0, 5):  # 0: the reference path through the model's own logits
        lm.zero_grad()
        loss = StudentLoss(lm, chunk)(*args)
        loss.backward()
        results.append((float(loss), [p.grad.clone() for p in lm.parameters()]))
    (ref, ref_grads), (ours, grads) = results
    logits = lm(input_ids=ids, attention_mask=attention, position_ids=position_ids(attention)).logits
    assert ref == pytest.approx(float(reverse_kl_loss(logits, targets, loss_mask, n_tokens)[0]), abs=1e-6)
    assert ours == pytest.approx(ref, abs=1e-5)
    for a, b in zip(ref_grads, grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_a_head_that_post_processes_logits_falls_back_to_full_logits() -> None:
    lm = AutoModelForCausalLM.from_pretrained(STUDENT)
    original = lm.forward

    def capped(*args, **kwargs):  # e.g. Gemma's final logit soft-capping
        out = original(*args, **kwargs)
        out.logits = 3 * torch.tanh(out.logits / 3)
        return out

    lm.forward = capped
    assert not hidden_path_matches(lm)
    assert StudentLoss(lm, chunk=5).chunk == 0


@pytest.mark.parametrize(("name", "beta"), [("forward_kl", 0.0), ("cross_entropy", 0.0), ("veto_forward", 0.8),
                                            ("veto_reverse", 0.5)])
def test_every_loss_chunks_to_its_plain_value_and_gradient(name: str, beta: float) -> None:
    g = torch.Generator().manual_seed(3)
    n, vocab = 23, 31
    h = torch.randn(n, 8, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(vocab, 8, generator=g, dtype=torch.float64).requires_grad_()
    targets, tokens = _targets(n, vocab, 6, 3), torch.randint(vocab, (n,), generator=g)
    plain = loss_rows(name, (h @ w.T).float().log_softmax(-1), targets, tokens, beta).clamp_min(0).sum()
    plain_grads = torch.autograd.grad(plain, (h, w))
    chunked = chunked_loss_sum(h, w, None, targets, 5, name, tokens, beta)
    assert float(chunked) == pytest.approx(float(plain), rel=1e-5, abs=1e-5)
    for a, b in zip(plain_grads, torch.autograd.grad(chunked, (h, w)), strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
