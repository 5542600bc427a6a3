"""The SGLang backend: teacher logprobs from an SGLang server over HTTP, or from an in-process Engine.

Exact path (docs/sglang.md): an SGLang launched with `--enable-return-hidden-states` and
`--chunked-prefill-size -1` returns the final hidden state of every position it computes; the backend
projects them with the checkpoint's own lm_head (`lm_head.py`): exact top-k, exact tail, full
logprobs. Otherwise SGLang returns top-k logprobs only (no full vocabulary, no tail mass), so `full`
requests are refused (a 422 `unsupported` before any work is queued) and the tail is rebuilt from the
top-k within a bound. Sessions are stateless calls that resend each row's whole prefix: SGLang's
radix cache reuses it, so a step costs the new tokens, not the prefix.

Hidden rows: SGLang returns one row per position it computed in the prefill, i.e. positions
cached..L-1 where `cached` (meta_info.cached_tokens) is the radix-cache hit, which is capped at
logprob_start_len = start. So positions start..L-1 are the last L - start rows. The cap holds only with
return_logprob (without it a resent prefix is served from the cache and leaves one row), so the
hidden-state call asks for logprobs too, with top_logprobs_num 0: one small input entry per position.

Position alignment (docs/sglang.md). Ours: position p is the distribution after ids[:p+1]. SGLang's,
for `logprob_start_len = s` and a prompt of length L: each input list has L - s entries, entry i is
about token ids[s+i], entry 0 is null, and input_top_logprobs[i] (i >= 1) is the distribution after
ids[:s+i]. For positions start..L-1 (n = L - start rows) we send s = start and read row j (p = start+j):
    j = 0 .. n-2   (p <= L-2):  input_top_logprobs[j + 1]    (after ids[:s+j+1] = ids[:p+1])
    j = n-1        (p  = L-1):  output_top_logprobs[0]       (max_new_tokens = 1: after all of ids)
    next_token_logprobs[j] = input_token_logprobs[j + 1]    (logprob of ids[p+1], j = 0 .. n-2)
"""

from __future__ import annotations

import base64
import logging
from typing import Any

import numpy as np

from shared.fingerprint import tokenizer_fingerprint
from shared.protocol import ScoreRequest, SequenceScores
from teacher_server.backends.base import (  # noqa: F401 - tail_from_top: re-exported
    TOPK_MASS_BOUND,
    Backend,
    BackendInfo,
    SessionState,
    StepArrays,
    UnsupportedRequest,
    tail_from_top,
    topk_with_tail,
)
from teacher_server.backends.lm_head import LMHead, chunks, scores_from_hidden, stored_dtype
from teacher_server.backends.sglang_transport import (
    EngineTransport,
    GenerateCall,
    HTTPTransport,
    MetaInfo,
    Rows,
    SGLangError,
    max_prompt_len,
    resolve_dtype,
)

log = logging.getLogger(__name__)
ENTRY_BUDGET = 1 << 20  # positions x returned logprobs per /generate call: bounds SGLang's memory and our JSON
UNSAID_MARGIN = 7  # model context - longest prompt when SGLang does not report max_req_input_len (6 + 1)


def _lp(value: float | None) -> float:
    return float("-inf") if value is None else value


def _topk(rows: Rows, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, k) ids and logprobs, checking that every position holds exactly k entries."""
    if any(row is None or len(row) != k for row in rows):
        raise SGLangError(f"SGLang returned a top-k row without exactly {k} entries")
    entries = [row or [] for row in rows]
    ids = np.array([[e[1] for e in row] for row in entries], np.int32).reshape(len(rows), k)
    return ids, np.array([[_lp(e[0]) for e in row] for row in entries], np.float32).reshape(len(rows), k)


def _by_id(rows: Rows, token_ids: list[int]) -> np.ndarray:
    """(n, len(token_ids)) logprobs in the requested order, matched by id (SGLang's order is its own)."""
    out = np.empty((len(rows), len(token_ids)), np.float32)
    for r, row in enumerate(rows):
        found = {e[1]: _lp(e[0]) for e in row or []}
        if missing := set(token_ids) - found.keys():
            raise SGLangError(f"SGLang left out the logprobs of token ids {sorted(missing)}")
        out[r] = [found[t] for t in token_ids]
    return out


def _flat_input_top(meta: MetaInfo, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids and logprobs of positions start..L-2 from the flat base64 input top-k: entry 0 (null) is the
    one leading null position, then one [k] row per entry 1..n-1 (SGLang's `_build_flat_top_logprobs_fields`)."""
    shape, nulls = meta.input_top_logprobs_shape, meta.input_top_logprobs_null_prefix
    dtypes = (meta.input_top_logprobs_val_flat_b64_dtype, meta.input_top_logprobs_idx_flat_b64_dtype)
    if shape != (n - 1, k) or nulls != 1 or dtypes != ("float32", "int32"):
        raise SGLangError(f"SGLang's flat input top-k is {shape} {dtypes} after {nulls} null rows; expected "
                          f"({n - 1}, {k}) float32/int32 after 1")
    try:
        lp = np.frombuffer(base64.b64decode(meta.input_top_logprobs_val_flat_b64 or "", validate=True), "<f4")
        ids = np.frombuffer(base64.b64decode(meta.input_top_logprobs_idx_flat_b64 or "", validate=True), "<i4")
    except ValueError as exc:  # bad base64, or a byte count that is not a whole number of values
        raise SGLangError(f"SGLang's flat input top-k does not decode: {exc}") from exc
    if lp.size != (n - 1) * k or ids.size != lp.size:
        raise SGLangError(f"SGLang's flat input top-k holds {lp.size} values and {ids.size} ids for "
                          f"{n - 1} x {k}")
    return ids.reshape(n - 1, k), lp.reshape(n - 1, k)


def _top_rows(meta: MetaInfo, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, k) top-k ids and logprobs of positions start..L-1, from the flat input arrays when SGLang sent
    them (it falls back to nested lists when it cannot make them) and the nested output row."""
    if meta.input_top_logprobs_shape is None:
        return _topk(_positions(meta, "top_logprobs", n), k)
    ids, lp = _flat_input_top(meta, n, k)
    last_ids, last_lp = _topk(meta.output_top_logprobs[:1], k)
    if len(last_ids) != 1:
        raise SGLangError("SGLang returned no output top-k row for the last position")
    return np.concatenate([ids, last_ids]), np.concatenate([lp, last_lp])


def _positions(meta: MetaInfo, field: str, n: int) -> Rows:
    """Rows for positions start..L-1: input entries 1..n-1, then output entry 0 (the module docstring)."""
    rows = getattr(meta, f"input_{field}")[1:] + getattr(meta, f"output_{field}")[:1]
    if len(rows) != n:
        raise SGLangError(f"SGLang returned {len(rows)} {field} rows where {n} were expected")
    return rows


def as_reported(ids: list[int], vocab_size: int) -> list[int]:
    """The token ids SGLang reports in input_token_logprobs for `ids`: its logprob result processor
    writes 0 for any id >= vocab_size - 1 (meant for image-token hashes, it also hits the last real id).
    The logprob itself is of the true token."""
    return [t if t < vocab_size - 1 else 0 for t in ids]


def sequence_scores(meta: MetaInfo, seq: list[int], start: int, top_k: int,
                    token_ids: list[int] | None, vocab_size: int) -> SequenceScores:
    """One sequence's scores from its `meta_info`, asked with logprob_start_len = start.

    `vocab_size` is SGLang's (the model config's `vocab_size`), for the id rewrite of `as_reported`.
    """
    n, inputs = len(seq) - start, meta.input_token_logprobs
    if meta.prompt_tokens != len(seq) or len(inputs) != n:
        raise SGLangError(f"SGLang returned {len(inputs)} input entries for prompt length {meta.prompt_tokens}, "
                          f"start {start}; expected {n} for length {len(seq)} (the L - s rule; a shorter "
                          "prompt_tokens means SGLang truncated it, as with --allow-auto-truncate)")
    if [e[1] for e in inputs] != as_reported(seq[start:], vocab_size):
        raise SGLangError("SGLang's input entries are not about the tokens sent: alignment is off")
    top_ids, top_lp = _top_rows(meta, n, top_k) if top_k else _topk([[]] * n, 0)
    token_lp = None if token_ids is None else _by_id(
        _positions(meta, "token_ids_logprobs", n) if token_ids else [[]] * n, token_ids)
    return SequenceScores(start=start, top_ids=top_ids, top_logprobs=top_lp, tail_logprob=tail_from_top(top_lp),
                          next_token_logprobs=np.array([_lp(e[0]) for e in inputs[1:]], np.float32),
                          token_logprobs=token_lp)


class SGLangSession(SessionState):
    """A session is just the rows' full prefixes; SGLang's radix cache holds the KV."""

    def __init__(self, prefixes: list[list[int]]) -> None:
        self.prefixes = prefixes

    @property
    def lengths(self) -> list[int]:  # type: ignore[override]
        return [len(p) for p in self.prefixes]

    @property
    def nbytes(self) -> int:
        return 8 * sum(len(p) for p in self.prefixes)  # the prefixes we keep (the KV lives in SGLang)


class SGLangBackend(Backend):
    """Scores through SGLang. The model path is still read locally, for the tokenizer and the vocab size.

    `max_context` (what /v1/model advertises and every request is checked against) is SGLang's own
    limit, so an over-long sequence gets our 422 naming it instead of SGLang's 400, which would fail
    every sequence batched with it. `api_key` is the SGLang server's --api-key.
    """

    def __init__(self, model: str, url: str | None = None, engine: bool = False, name: str | None = None,
                 max_context: int | None = None, vocab_size: int | None = None, dtype: str = "auto",
                 api_key: str | None = None, wait_s: float = 600.0) -> None:
        if bool(url) == engine:
            raise ValueError("the sglang backend needs exactly one of a server URL (--sglang-url) or --sglang-engine")
        from transformers import AutoConfig, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model)
        config = AutoConfig.from_pretrained(model).get_text_config()
        vocab = vocab_size or getattr(config, "vocab_size", None) or len(tokenizer)
        self.sglang_vocab = int(getattr(config, "vocab_size", None) or vocab)  # what SGLang's ModelConfig reads
        self.transport: HTTPTransport | EngineTransport = (
            HTTPTransport(url, api_key=api_key, ready_timeout_s=wait_s) if url else EngineTransport(model, dtype))
        limit = max_prompt_len(self.transport.max_req_input_len, self.transport.context_len)
        if limit is None:
            limit = (getattr(config, "max_position_embeddings", None) or 4096) - UNSAID_MARGIN
            log.warning("SGLang did not report max_req_input_len; assuming prompts up to %d tokens", limit)
        config_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        dtype_run = resolve_dtype(self.transport.dtype, config_dtype, getattr(config, "model_type", "") or "")
        self.head = LMHead(model) if self.transport.hidden_states else None
        if self.head is not None:  # the hidden states' own bits tell the dtype SGLang computed them in
            dtype_run = stored_dtype(self._hidden([([1, 2, 3, 4], 0)])[0])
        self.info = BackendInfo(
            name=name or model, backend="sglang", vocab_size=int(vocab),
            tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), max_context=int(min(max_context or limit, limit)),
            dtype=dtype_run, device=f"sglang {url}" if url else "sglang engine",
            supports_full=self.head is not None, tail_bound=0.0 if self.head is not None else TOPK_MASS_BOUND,
            engine_urls=(self.transport.url,) if url else (),
            kv_sessions=False)  # each extend re-sends the prefix; SGLang chunks its own prefills

    def score(self, requests: list[ScoreRequest]) -> list[list[SequenceScores]]:
        """Sequences of requests that share top_k and token_ids go out in one batched /generate call."""
        if self.head is not None:
            return [self._exact(req) for req in requests]
        if any(req.full for req in requests):
            raise UnsupportedRequest("full: SGLang returns top-k logprobs only; ask for top_k and token_ids")
        out: list[list[Any]] = [[None] * len(req.sequences) for req in requests]
        starts = [req.starts() for req in requests]
        groups: dict[tuple[int, tuple[int, ...] | None], list[tuple[int, int]]] = {}
        for r, req in enumerate(requests):
            key = (req.top_k, None if req.token_ids is None else tuple(req.token_ids))
            groups.setdefault(key, []).extend((r, i) for i in range(len(req.sequences)))
        for (top_k, ids), where in groups.items():
            items = [(requests[r].sequences[i], starts[r][i]) for r, i in where]
            for (r, i), res in zip(where, self._scores(items, top_k, None if ids is None else list(ids)), strict=True):
                out[r][i] = res
        return out

    def _exact(self, req: ScoreRequest) -> list[SequenceScores]:
        assert self.head is not None
        items = list(zip(req.sequences, req.starts(), strict=True))
        return scores_from_hidden(self.head, self._hidden(items), items, req)

    def _hidden(self, items: list[tuple[list[int], int]]) -> list[np.ndarray]:
        """(L - start, H) hidden states of positions start..L-1 of each (sequence, start) item."""
        width = self.head.hidden_size if self.head is not None else 1
        out: list[np.ndarray] = []
        for part in chunks([(len(seq) - start) * width for seq, start in items], ENTRY_BUDGET):
            call = GenerateCall([seq for seq, _ in items[part]], [start for _, start in items[part]], 0, None,
                                return_hidden_states=True)
            for meta, (seq, start) in zip(self.transport.generate(call), items[part], strict=True):
                out.append(hidden_rows(meta, len(seq), start))
        return out

    def _scores(self, items: list[tuple[list[int], int]], top_k: int,
                token_ids: list[int] | None) -> list[SequenceScores]:
        """Scores of (sequence, start) items, in order, in calls of at most ENTRY_BUDGET returned values."""
        width = max(top_k, 1) + len(token_ids or ())
        out: list[SequenceScores] = []
        for part in chunks([(len(seq) - start) * width for seq, start in items], ENTRY_BUDGET):
            call = GenerateCall([seq for seq, _ in items[part]], [start for _, start in items[part]], top_k, token_ids)
            out += [sequence_scores(meta, seq, start, top_k, token_ids, self.sglang_vocab)
                    for meta, (seq, start) in zip(self.transport.generate(call), items[part], strict=True)]
        return out

    def open_session(self, sequences: list[list[int]], top_k: int) -> tuple[SGLangSession, StepArrays]:
        prefixes = [list(seq) for seq in sequences]
        return SGLangSession(prefixes), self._last(prefixes, top_k)

    def extend_session(self, state: SGLangSession, rows: list[int], tokens: list[list[int]],
                       top_k: int, all_positions: bool = False) -> StepArrays:
        grown = [state.prefixes[r] + list(t) for r, t in zip(rows, tokens, strict=True)]
        if all_positions:  # positions old length .. L-1: the distributions after each new token
            starts = [len(state.prefixes[r]) for r in rows]
            step = self._step(list(zip(grown, starts, strict=True)), top_k)
        else:
            step = self._last(grown, top_k)
        for r, prefix in zip(rows, grown, strict=True):  # only once SGLang has answered
            state.prefixes[r] = prefix
        return step

    def _last(self, seqs: list[list[int]], top_k: int) -> StepArrays:
        """Next-token top-k after each whole sequence: position L-1, so logprob_start_len = L - 1.

        That returns only the null input entry plus output_top_logprobs[0]; and as radix-cache reuse is
        capped at the start, up to L - 1 tokens are reused: everything the previous step sent.
        """
        return self._step([(seq, len(seq) - 1) for seq in seqs], top_k)

    def _step(self, items: list[tuple[list[int], int]], top_k: int) -> StepArrays:
        if self.head is None:
            return _stacked(self._scores(items, top_k, None))
        top_ids, top_lp, tail = topk_with_tail(self.head.logprobs(np.concatenate(self._hidden(items))), top_k)
        return StepArrays(top_ids=top_ids.int().numpy(), top_logprobs=top_lp.numpy(), tail_logprob=tail.numpy())

    def close(self) -> None:
        self.transport.close()


def hidden_rows(meta: MetaInfo, length: int, start: int) -> np.ndarray:
    """Positions start..L-1 of the prefill's hidden rows, which cover the computed positions cached..L-1."""
    prefill = meta.hidden
    computed = length - meta.cached_tokens
    if prefill is None or len(prefill) != computed or computed < length - start:
        got = "no hidden states" if prefill is None else f"{len(prefill)} hidden rows"
        raise SGLangError(f"SGLang returned {got} for a prompt of {length} tokens with {meta.cached_tokens} cached "
                          f"and start {start}; expected {computed} rows (is chunked prefill off?)")
    return prefill[computed - (length - start):]


def _stacked(scores: list[SequenceScores]) -> StepArrays:
    """Every position of `scores`, sequence after sequence, as one session step."""
    return StepArrays(top_ids=np.concatenate([r.top_ids for r in scores]),
                      top_logprobs=np.concatenate([r.top_logprobs for r in scores]),
                      tail_logprob=np.concatenate([r.tail_logprob for r in scores]))
