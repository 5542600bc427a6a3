"""The transformers backend against a direct forward of the same model (the slow obvious path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import f32_diff, f32_tol
from shared.protocol import ScoreRequest
from teacher_server.backends.hf import HFBackend

SEQS = [[1, 5, 6, 7, 8, 9, 10, 11, 12], [1, 13, 14], [1, 4, 4, 4, 4, 4], [2]]


@pytest.fixture(scope="module")
def backend(tiny_model: Path) -> HFBackend:
    return HFBackend(str(tiny_model))


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> AutoModelForCausalLM:
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def direct_logprobs(model: AutoModelForCausalLM, seq: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([seq])).logits[0].float().log_softmax(-1).numpy()


def test_score_matches_direct_forward(backend: HFBackend, reference: AutoModelForCausalLM) -> None:
    starts = [0, 1, 3, 0]
    req = ScoreRequest(sequences=SEQS, start=starts, top_k=7, token_ids=[3, 9, 40], full=True)
    (results,) = backend.score([req])
    worst, scale = 0.0, 0.0
    for seq, start, res in zip(SEQS, starts, results, strict=True):
        ref = direct_logprobs(reference, seq)[start:]
        assert res.logprobs.shape == ref.shape
        worst, scale = max(worst, float(np.abs(res.logprobs - ref).max())), max(scale, float(np.abs(ref).max()))
        ref_ids = np.argsort(-ref, axis=-1, kind="stable")[:, :7]
        assert np.array_equal(res.top_ids, ref_ids)
        assert np.allclose(res.top_logprobs, np.take_along_axis(ref, ref_ids, -1), atol=1e-5)
        assert np.allclose(res.token_logprobs, ref[:, [3, 9, 40]], atol=1e-5)
        nxt = np.array(seq[start + 1 :], dtype=np.int64)
        assert np.allclose(res.next_token_logprobs, ref[np.arange(len(nxt)), nxt], atol=1e-5)
        mass_out = 1 - np.exp(np.take_along_axis(ref, ref_ids, -1)).sum(-1)
        assert np.allclose(np.exp(res.tail_logprob), mass_out, atol=1e-6)
    assert worst <= f32_tol(scale), (worst, scale)  # the whole vocabulary: rounding at its largest |logprob|


def test_batched_requests_equal_separate_ones(backend: HFBackend) -> None:
    a = ScoreRequest(sequences=SEQS[:2], top_k=3)
    b = ScoreRequest(sequences=SEQS[2:], top_k=5, start=[2, 0])
    together = backend.score([a, b])
    alone = [backend.score([a])[0], backend.score([b])[0]]
    for x_list, y_list in zip(together, alone, strict=True):
        for x, y in zip(x_list, y_list, strict=True):
            assert np.array_equal(x.top_ids, y.top_ids)
            assert np.allclose(x.top_logprobs, y.top_logprobs, atol=1e-6)


def test_sessions_match_rescoring_full_prefixes(backend: HFBackend) -> None:
    """64 extend steps, rows finishing and resuming, multi-token steps: same as scoring from scratch."""
    prefixes = [[1, 5, 6], [1, 7, 8, 9, 10], [2, 20]]
    state, step = backend.open_session([list(p) for p in prefixes], top_k=5)
    rng = np.random.default_rng(0)
    for t in range(64):
        rows = [0, 1, 2] if t % 4 else [1, 2]  # row 0 skips some steps
        tokens = [[int(x) for x in rng.integers(4, 40, size=1 if t % 9 else 3)] for _ in rows]
        step = backend.extend_session(state, rows, tokens, top_k=5)
        for r, toks in zip(rows, tokens, strict=True):
            prefixes[r] += toks
        ref = backend.score([ScoreRequest(sequences=[prefixes[r] for r in rows],
                                          start=[len(prefixes[r]) - 1 for r in rows], top_k=5)])[0]
        for i, res in enumerate(ref):
            assert np.array_equal(res.top_ids[0], step.top_ids[i])
            diff, tol = f32_diff(step.top_logprobs[i], res.top_logprobs[0])
            assert diff <= tol, (t, diff, tol)
    assert state.lengths == [len(p) for p in prefixes]
    assert state.nbytes > 0
