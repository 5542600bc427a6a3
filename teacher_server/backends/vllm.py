"""The vLLM backend: teacher logprobs from a running vLLM server, as hidden states or as top-k.

Two kinds of vLLM server, told apart at startup (docs/vllm.md):
- a **pooling runner** (`--runner pooling`, pooler task `token_embed` over ALL tokens, no activation)
  returns the final hidden state of every position through `/pooling`; the backend projects it with
  the checkpoint's own lm_head (`lm_head.py`): exact top-k, exact tail, full logprobs, chosen ids.
- a **generate server** (the default) returns prompt logprobs through `/v1/completions`: the rest of
  this docstring. Its float32 top-k cannot resolve a small tail, which is rebuilt within a bound.

vLLM's prompt logprobs give, at each prompt position, the logprob of the actual next token plus the
top-k (`prompt_logprobs = k`), never the full vocabulary and never chosen ids, so `full` and
`token_ids` requests are refused with a 422 before any work is queued, and the tail is rebuilt from
the top-k. Sessions are refused too: prompt logprobs bypass vLLM's prefix cache, so a session that
re-sends its prefix at every step would cost O(L^2). Temperature never applies to prompt logprobs.

Position alignment (docs/vllm.md). Ours: position p is the distribution after ids[:p+1]. vLLM's, for a
prompt `ids` of length L: `prompt_logprobs` has L entries, entry 0 is null and entry i (i >= 1) is the
distribution after ids[:i], holding ids[i] (the "actual" token) and the top-k. There is no entry for
after the whole prompt, so the backend appends one dummy id (DUMMY) and sends L + 1 tokens:
    row j = p - start (p = start .. L-1):  entry p + 1 of the extended prompt (after ids[:p+1])
    next_token_logprobs[j] (p <= L-2):     entry p + 1's value for its actual token ids[p+1]
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from itertools import chain
from operator import itemgetter
from typing import Any

import numpy as np

from shared.fingerprint import tokenizer_fingerprint
from shared.protocol import ScoreRequest, SequenceScores
from teacher_server.backends.base import (
    TOPK_MASS_BOUND,
    Backend,
    BackendInfo,
    SessionState,
    StepArrays,
    UnsupportedRequest,
    tail_from_top,
)
from teacher_server.backends.lm_head import LMHead, scores_from_hidden, stored_dtype
from teacher_server.backends.vllm_transport import MAX_PROMPTS, HTTPTransport, Position, VLLMError

log = logging.getLogger("teacher_server.engine")
DUMMY = 0  # the id appended to every sequence so that vLLM scores the position after its last token
NEG_INF_AS = -9999.0  # vLLM writes -inf prompt logprobs as this (JSON has no -inf)
ENTRY_BUDGET = 1 << 20  # positions x returned logprobs per call: bounds vLLM's detokenizing and our JSON
_RANK, _LOGPROB = itemgetter("rank"), itemgetter("logprob")
SESSIONS_REFUSED = "sessions: the vllm backend serves /v1/score only (see docs/vllm.md)"


def _lp(value: float) -> float:
    return float("-inf") if value == NEG_INF_AS else float(value)


def split_entry(entry: Position, actual: int, k: int) -> tuple[list[int], list[float], float]:
    """(top-k ids by rank, their logprobs, the actual token's logprob) of one position, as vLLM sent it.

    vLLM builds the entry as {actual, top_1 .. top_k} in a dict, so when the actual token is in the
    top-k the two merge (k keys, rank from the top-k) and otherwise there are k + 1 keys. Dropping the
    actual token's key in the second case leaves exactly the top-k, whose ranks must be 1 .. k.
    """
    key = str(actual)
    if not isinstance(entry, dict) or key not in entry:
        raise VLLMError(f"vLLM's prompt_logprobs entry lacks the actual token {actual}: alignment is off")
    if len(entry) not in (k, k + 1):
        raise VLLMError(f"vLLM returned {len(entry)} logprobs at a position where {k} or {k + 1} were expected")
    outside = key if len(entry) == k + 1 else None
    try:
        top = sorted((e["rank"], int(t), _lp(e["logprob"])) for t, e in entry.items() if t != outside)
        actual_lp = _lp(entry[key]["logprob"])
    except (KeyError, TypeError, ValueError) as exc:  # a missing or non-numeric field, a null rank
        raise VLLMError(f"vLLM's prompt_logprobs entry for token {actual} is malformed: {exc!r}") from exc
    if [r[0] for r in top] != list(range(1, k + 1)):
        raise VLLMError(f"vLLM's top-{k} ranks are {[r[0] for r in top]}, not 1..{k}")
    return [r[1] for r in top], [r[2] for r in top], actual_lp


class _Unread(Exception):
    """The bulk reader met something it does not expect; `split_entry` then names the row and the fault."""


def _bulk_rows(entries: list[Position], actual: list[int], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(top_ids [n, k], top_logprobs [n, k], the actual token's logprob [n]) of n entries, read in one pass.

    The same rules as `split_entry`, checked on whole arrays: every entry has k or k + 1 keys, one of them
    the actual token; the actual token's key is dropped where there are k + 1; what is left fills every
    rank 1..k of its row exactly once. Reading 30k entries one at a time with a sort each took as long
    as parsing vLLM's JSON (docs/engines.md#the-proxys-cost).
    """
    n = len(entries)
    sizes = np.fromiter(map(len, entries), np.int64, n)  # TypeError on a null entry
    if ((sizes != k) & (sizes != k + 1)).any():
        raise _Unread
    values = list(chain.from_iterable(map(dict.values, entries)))
    ids = np.array(list(chain.from_iterable(entries)), np.int64)
    ranks = np.fromiter(map(_RANK, values), np.int64, len(values))
    logprobs = np.fromiter(map(_LOGPROB, values), np.float64, len(values))
    row = np.repeat(np.arange(n), sizes)
    is_actual = ids == np.repeat(np.asarray(actual, np.int64), sizes)
    if not np.array_equal(row[is_actual], np.arange(n)):  # keys are unique: at most one hit per row
        raise _Unread
    logprobs[logprobs == NEG_INF_AS] = -np.inf
    keep = ~(is_actual & (sizes == k + 1)[row])  # by id, not rank: a tie at the boundary shares a rank
    kept_ranks = ranks[keep]
    slot = row[keep] * k + kept_ranks - 1
    if ((kept_ranks < 1) | (kept_ranks > k)).any() or not (np.bincount(slot, minlength=n * k) == 1).all():
        raise _Unread
    top_ids, top_lp = np.empty(n * k, np.int32), np.empty(n * k, np.float32)
    top_ids[slot], top_lp[slot] = ids[keep], logprobs[keep]
    return top_ids.reshape(n, k), top_lp.reshape(n, k), logprobs[is_actual].astype(np.float32)


def answer_scores(answers: list[list[Position]], items: list[tuple[list[int], int]], k: int) -> list[SequenceScores]:
    """The scores of every (sequence, start) in `items` from the prompt_logprobs vLLM returned for each
    `sequence + [DUMMY]` (the module docstring), all sequences of one call read together."""
    entries: list[Position] = []
    actual: list[int] = []
    for positions, (seq, start) in zip(answers, items, strict=True):
        sent = [*seq, DUMMY]
        if len(positions) != len(sent) or positions[0] is not None:
            raise VLLMError(f"vLLM returned {len(positions)} prompt_logprobs entries for a prompt of {len(sent)} "
                            "tokens; expected one per token, the first null")
        entries += positions[start + 1:]
        actual += sent[start + 1:]
    try:
        top_ids, top_lp, actual_lp = _bulk_rows(entries, actual, k)
    except (_Unread, KeyError, TypeError, ValueError):
        for entry, token in zip(entries, actual, strict=True):
            split_entry(entry, token, k)  # raises the VLLMError that names the first bad entry
        raise
    tails = tail_from_top(top_lp)
    out: list[SequenceScores] = []
    lo = 0
    for seq, start in items:
        hi = lo + len(seq) - start
        out.append(SequenceScores(start=start, top_ids=top_ids[lo:hi], top_logprobs=top_lp[lo:hi],
                                  tail_logprob=tails[lo:hi], next_token_logprobs=actual_lp[lo:hi - 1]))
        lo = hi
    return out


def sequence_scores(positions: list[Position], seq: list[int], start: int, k: int) -> SequenceScores:
    """One sequence's scores from the prompt_logprobs of `seq + [DUMMY]` (the module docstring)."""
    return answer_scores([positions], [(seq, start)], k)[0]


def batches(lengths: list[int], width: int) -> Iterator[slice]:
    """Consecutive slices of prompts within MAX_PROMPTS and ENTRY_BUDGET (positions x width)."""
    lo, total = 0, 0
    for i, n in enumerate(lengths):
        if i > lo and (total + n * width > ENTRY_BUDGET or i - lo == MAX_PROMPTS):
            yield slice(lo, i)
            lo, total = i, 0
        total += n * width
    if lo < len(lengths):
        yield slice(lo, len(lengths))


class VLLMBackend(Backend):
    """Scores through vLLM. The model path is still read locally, for the tokenizer and the vocab size
    (and, with a pooling runner, the lm_head).

    `max_context` is vLLM's limit: for a generate server, less the dummy token (vLLM refuses prompts of
    max_model_len tokens: no room for the one generated token, so L + 1 <= max_model_len - 1); a
    pooling runner takes max_model_len. `max_top_k` is vLLM's `--max-logprobs` (generate server).
    `api_key` is the vLLM server's --api-key; `wait_s` how long to wait for its /health.
    """

    def __init__(self, model: str, url: str, name: str | None = None, max_context: int | None = None,
                 api_key: str | None = None, wait_s: float = 600.0, dtype: str = "auto") -> None:
        from transformers import AutoConfig, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model)
        config = AutoConfig.from_pretrained(model).get_text_config()
        vocab = int(getattr(config, "vocab_size", None) or len(tokenizer))  # vLLM's ModelConfig.get_vocab_size
        self.transport = HTTPTransport(url, api_key=api_key, ready_timeout_s=wait_s)
        config_dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
        common = dict(name=name or model, backend="vllm", vocab_size=vocab,
                      tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), device=f"vllm {url}",
                      kv_sessions=False, supports_sessions=False, engine_urls=(self.transport.url,))
        self.head: LMHead | None = None
        if self.transport.pooling:
            self.head = LMHead(model)
            probe = self.transport.hidden_states([[0, 1, 2, 3]])[0]
            limit = self.transport.max_model_len
            found = self.transport.launch_dtype or stored_dtype(probe)
            if dtype not in ("auto", found):
                raise VLLMError(f"--vllm-dtype {dtype}, but vLLM's hidden states are {found}")
            self.info = BackendInfo(**common, max_context=int(min(max_context or limit, limit)), dtype=found)
        else:
            limit = self.transport.max_model_len - 2
            said = None if dtype == "auto" else dtype
            if not (said or self.transport.launch_dtype):
                log.warning("vLLM does not report its dtype; assuming %s (what --dtype auto picks for this "
                            "checkpoint); state it with --vllm-dtype", vllm_dtype(config_dtype))
            self.info = BackendInfo(**common, max_context=int(min(max_context or limit, limit)),
                                    dtype=said or self.transport.launch_dtype or vllm_dtype(config_dtype),
                                    supports_full=False, supports_token_ids=False, tail_bound=TOPK_MASS_BOUND,
                                    max_top_k=self.transport.max_logprobs(vocab))

    def score(self, requests: list[ScoreRequest]) -> list[list[SequenceScores]]:
        """With a pooling runner: one /pooling call per batch, every request projected by the lm_head.
        Else sequences of requests that share top_k go out in one batched /v1/completions call."""
        if self.head is not None:
            return [self._from_hidden(req) for req in requests]
        if any(req.full or req.token_ids for req in requests):  # limits.py refuses these first
            raise UnsupportedRequest("full, token_ids: vLLM returns the top-k and the actual token only")
        out: list[list[Any]] = [[None] * len(req.sequences) for req in requests]
        starts = [req.starts() for req in requests]
        groups: dict[int, list[tuple[int, int]]] = {}
        for r, req in enumerate(requests):
            groups.setdefault(req.top_k, []).extend((r, i) for i in range(len(req.sequences)))
        for top_k, where in groups.items():
            items = [(requests[r].sequences[i], starts[r][i]) for r, i in where]
            for (r, i), res in zip(where, self._scores(items, top_k), strict=True):
                out[r][i] = res
        if any(req.token_ids is not None for req in requests):  # `token_ids: []`: an empty column
            for req, rows in zip(requests, out, strict=True):
                for res in rows:
                    res.token_logprobs = None if req.token_ids is None else np.zeros((len(res.top_ids), 0), np.float32)
        return out

    def _from_hidden(self, req: ScoreRequest) -> list[SequenceScores]:
        assert self.head is not None
        items = list(zip(req.sequences, req.starts(), strict=True))
        out: list[SequenceScores] = []
        for part in batches([len(seq) for seq, _ in items], self.head.hidden_size):
            hidden = self.transport.hidden_states([seq for seq, _ in items[part]])
            out += scores_from_hidden(self.head, [h[start:] for h, (_, start) in zip(hidden, items[part], strict=True)],
                                      items[part], req)
        return out

    def _scores(self, items: list[tuple[list[int], int]], top_k: int) -> list[SequenceScores]:
        out: list[SequenceScores] = []
        for part in batches([len(seq) + 1 for seq, _ in items], top_k + 1):
            prompts = [[*seq, DUMMY] for seq, _ in items[part]]
            answers = self.transport.prompt_logprobs(prompts, top_k)
            out += answer_scores(answers, items[part], top_k)
        return out

    def open_session(self, sequences: list[list[int]], top_k: int) -> tuple[SessionState, StepArrays]:
        raise UnsupportedRequest(SESSIONS_REFUSED)  # limits.py answers the 422 before this is reached

    def extend_session(self, state: SessionState, rows: list[int], tokens: list[list[int]],
                       top_k: int, all_positions: bool = False) -> StepArrays:
        raise UnsupportedRequest(SESSIONS_REFUSED)

    def close(self) -> None:
        self.transport.close()


def vllm_dtype(config_dtype: str) -> str:
    """What `vllm serve --dtype auto` (its default) runs a checkpoint in: the config's dtype, except that
    float32 checkpoints are downcast to the platform's first supported dtype (bfloat16 on CUDA GPUs
    that have it). No vLLM route reports the dtype, so a vLLM started with another --dtype is not seen."""
    name = config_dtype.removeprefix("torch.")
    return "bfloat16" if name == "float32" else name
