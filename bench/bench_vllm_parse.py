"""CPU to read a vLLM answer of prompt logprobs: every sequence of the answer in one vectorized pass (the
route the teacher takes, `answer_scores`) against one entry at a time with a sort each (`split_entry`, the
reference it replaced, which now only names a bad entry).

A synthetic answer of vLLM's shape (`{"choices": [{"prompt_logprobs": [null, {id: {logprob, rank,
decoded_token}}, ...]}]}`, the actual token's key first and merged when it is in the top-k) at the proxy
bench's size (32 sequences of 46 tokens, top-20) and at a long one (8 of 1,024, top-20). The JSON parse
(pydantic_core, the same for both) is its own column. No engine needed; the least CPU of 5 rounds each.

    .venv/bin/python -m bench.bench_vllm_parse
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import numpy as np
from pydantic_core import from_json

from shared.protocol import SequenceScores
from teacher_server.backends.base import tail_from_top
from teacher_server.backends.vllm import DUMMY, answer_scores, split_entry

VOCAB, TOP_K = 79, 20


def answer(batch: int, length: int, rng: np.random.Generator) -> tuple[bytes, list[list[int]]]:
    seqs = [rng.integers(3, VOCAB, length).tolist() for _ in range(batch)]
    choices = []
    for i, seq in enumerate(seqs):
        positions: list = [None]
        for actual in [*seq, DUMMY][1:]:
            top = rng.permutation(VOCAB)[:TOP_K].tolist()
            logprobs = np.sort(rng.uniform(-12, 0, TOP_K))[::-1].tolist()
            ranked = {str(t): {"logprob": lp, "rank": r, "decoded_token": chr(33 + t)}
                      for r, (t, lp) in enumerate(zip(top, logprobs, strict=True), 1)}
            head = ranked.get(str(actual), {"logprob": -13.0, "rank": TOP_K + 5, "decoded_token": "x"})
            positions.append({str(actual): head, **ranked})
        choices.append({"index": i, "text": "", "prompt_logprobs": positions})
    return json.dumps({"choices": choices}).encode(), seqs


def one_at_a_time(answers: list, seqs: list[list[int]]) -> list[SequenceScores]:
    out = []
    for positions, seq in zip(answers, seqs, strict=True):
        rows = [split_entry(positions[p + 1], [*seq, DUMMY][p + 1], TOP_K) for p in range(len(seq))]
        top_lp = np.array([r[1] for r in rows], np.float32)
        out.append(SequenceScores(start=0, top_ids=np.array([r[0] for r in rows], np.int32), top_logprobs=top_lp,
                                  tail_logprob=tail_from_top(top_lp),
                                  next_token_logprobs=np.array([r[2] for r in rows[:-1]], np.float32)))
    return out


def cpu_ms(fn: Callable[[], object]) -> float:
    started = time.process_time()
    fn()
    return 1000 * (time.process_time() - started)


def main() -> None:
    rng = np.random.default_rng(0)
    print("answer | MB | JSON parse, ms CPU | one entry at a time, ms CPU | one pass, ms CPU | ratio")
    for batch, length in ((32, 46), (8, 1024)):
        raw, seqs = answer(batch, length, rng)
        answers = [c["prompt_logprobs"] for c in from_json(raw)["choices"]]
        items = [(seq, 0) for seq in seqs]
        for a, b in zip(one_at_a_time(answers, seqs), answer_scores(answers, items, TOP_K), strict=True):
            assert np.array_equal(a.top_ids, b.top_ids) and np.array_equal(a.top_logprobs, b.top_logprobs)
            assert np.array_equal(a.next_token_logprobs, b.next_token_logprobs)
        rounds = [(cpu_ms(lambda: from_json(raw)), cpu_ms(lambda: one_at_a_time(answers, seqs)),
                   cpu_ms(lambda: answer_scores(answers, items, TOP_K))) for _ in range(5)]
        parse, old, new = (min(r[i] for r in rounds) for i in range(3))
        print(f"{batch} x {length} tokens, top-{TOP_K} | {len(raw) / 1e6:.1f} | {parse:.1f} | {old:.1f} | {new:.1f} "
              f"| {old / new:.2f}")


if __name__ == "__main__":
    main()
