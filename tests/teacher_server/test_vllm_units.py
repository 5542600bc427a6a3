"""vLLM's prompt-logprob answers read in bulk (`answer_scores`) against the one-entry reference (`split_entry`)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from teacher_server.backends.vllm import DUMMY, NEG_INF_AS, answer_scores, split_entry
from teacher_server.backends.vllm_transport import Entry, Position, VLLMError

VOCAB = 30


@st.composite
def entry_for(draw: st.DrawFn, actual: int, k: int) -> Position:
    """One entry as vLLM builds it: {actual, top_1..top_k}, the actual key first, merged when it is in the top-k."""
    top = draw(st.permutations(range(VOCAB)))[:k]
    logprobs = sorted(draw(st.lists(st.sampled_from([-0.25, -1.0, -3.5, NEG_INF_AS]), min_size=k, max_size=k)),
                      reverse=True)
    ranked = {str(t): Entry(logprob=lp, rank=r) for r, (t, lp) in enumerate(zip(top, logprobs, strict=True), 1)}
    if str(actual) in ranked:
        return {str(actual): ranked[str(actual)], **ranked}
    rank = draw(st.integers(k, VOCAB))  # may tie the k-th: vLLM's rank counts strictly larger logprobs
    return {str(actual): Entry(logprob=draw(st.sampled_from([-4.0, NEG_INF_AS])), rank=rank), **ranked}


@st.composite
def answer(draw: st.DrawFn) -> tuple[list[list[Position]], list[tuple[list[int], int]], int]:
    k = draw(st.integers(1, 6))
    answers, items = [], []
    for _ in range(draw(st.integers(1, 4))):
        seq = draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=7))
        sent = [*seq, DUMMY]
        answers.append([None] + [draw(entry_for(t, k)) for t in sent[1:]])
        items.append((seq, draw(st.integers(0, len(seq) - 1))))
    return answers, items, k


@settings(max_examples=150, deadline=None)
@given(answer())
def test_bulk_reader_matches_reading_each_entry(case: tuple) -> None:
    answers, items, k = case
    for got, positions, (seq, start) in zip(answer_scores(answers, items, k), answers, items, strict=True):
        rows = [split_entry(positions[p + 1], [*seq, DUMMY][p + 1], k) for p in range(start, len(seq))]
        assert got.start == start
        assert got.top_ids.tolist() == [r[0] for r in rows]
        np.testing.assert_array_equal(got.top_logprobs, np.array([r[1] for r in rows], np.float32).reshape(-1, k))
        np.testing.assert_array_equal(got.next_token_logprobs, np.array([r[2] for r in rows[:-1]], np.float32))
        assert got.tail_logprob.shape == (len(seq) - start,)


def _good(k: int = 2) -> list[Position]:
    """A three-token prompt [5, 6, 7] + DUMMY whose entries are all well formed."""
    def entry(actual: int) -> dict[str, Entry]:
        top = {"3": Entry(logprob=-0.5, rank=1), "4": Entry(logprob=-1.0, rank=2)}
        return top if str(actual) in top else {str(actual): Entry(logprob=-5.0, rank=9), **top}
    return [None, entry(6), entry(7), entry(DUMMY)]


@pytest.mark.parametrize(("bad", "words"), [
    ({"3": Entry(logprob=-0.5, rank=1), "4": Entry(logprob=-1.0, rank=2)}, "lacks the actual token 7"),
    ({"7": Entry(logprob=-5.0, rank=9), "3": Entry(logprob=-0.5, rank=1)}, "ranks are"),  # k keys: merged
    ({"7": Entry(logprob=-5.0, rank=9), **{str(t): Entry(logprob=-1.0, rank=t - 2) for t in (3, 4, 5)}},
     "4 logprobs"),
    ({"7": Entry(logprob=-5.0, rank=9), "3": Entry(logprob=-0.5, rank=1), "4": Entry(logprob=-1.0, rank=1)},
     "ranks are"),
    ({"7": Entry(logprob=-5.0, rank=9), "3": Entry(logprob=-0.5, rank=1), "4": {"logprob": -1.0}}, "malformed"),
    ({"7": Entry(logprob=-5.0, rank=9), "3": Entry(logprob=-0.5, rank=1), "4": {"logprob": "x", "rank": 2}},
     "malformed"),
    (None, "lacks the actual token 7"),
])
def test_a_bad_entry_in_a_batch_is_named_by_the_reference_reader(bad: Position, words: str) -> None:
    answers = [_good(), [*_good()[:2], bad, _good()[3]]]
    with pytest.raises(VLLMError, match=words):
        answer_scores(answers, [([5, 6, 7], 0), ([5, 6, 7], 0)], 2)


def test_a_wrong_number_of_entries_is_refused_before_reading() -> None:
    with pytest.raises(VLLMError, match="expected one per token"):
        answer_scores([_good()[:-1]], [([5, 6, 7], 0)], 2)
