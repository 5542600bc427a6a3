"""The wire protocol between the teacher server and its clients: every request and response model.

Server and client both import this module, so a field renamed here is renamed on both sides.
Alignment convention (the one every other system gets wrong somewhere): for a sequence `ids` of
length L, *position p* is the teacher's next-token distribution after `ids[:p+1]`. Scoring from
`start` returns positions `start .. L-1`; the last one is the distribution after the whole sequence.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.arrays import array_field

LogprobDtype = Literal["float32", "float16"]
TailKind = Literal["exact", "bounded"]
TAIL_DOC = ("How tail_logprob was obtained: `exact`, a logsumexp over the whole vocabulary; `bounded`, rebuilt "
            "as log(1 - sum(exp(top_logprobs))) from an engine's float32 top-k, whose mass is known only to within "
            "tail_bound (the true mass lies in [max(0, exp(tail) - tail_bound), exp(tail) + tail_bound]).")

Ids2D = array_field("int32", 2, "integer", "Token ids, shape (positions, k).")
Floats1D = array_field(None, 1, "number", "Log-probabilities, shape (positions,).")
Floats2D = array_field(None, 2, "number", "Log-probabilities, shape (positions, columns).")


class _Request(BaseModel):
    """Requests reject unknown fields; validators name the field at fault as `field: message`."""

    model_config = ConfigDict(extra="forbid")


class ScoreRequest(_Request):
    """Teacher distributions at every position of a batch of token sequences."""

    sequences: list[list[int]] = Field(
        min_length=1, description="Token id sequences; each must be non-empty."
    )
    start: int | list[int] = Field(
        0,
        description="First position returned: one int for all sequences or one per sequence. "
        "Position p is the next-token distribution after ids[:p+1]; 0 <= start <= len-1.",
    )
    top_k: int = Field(20, ge=0, description="How many most likely next tokens to return per position.")
    token_ids: list[int] | None = Field(
        None, description="Optional token ids whose logprobs are returned at every position."
    )
    full: bool = Field(False, description="Return the full-vocabulary logprobs (when the server allows it).")
    logprob_dtype: LogprobDtype = Field("float32", description="Float type of the returned logprobs.")

    @model_validator(mode="after")
    def _check_shapes(self) -> "ScoreRequest":
        for i, seq in enumerate(self.sequences):
            if not seq:
                raise ValueError(f"sequences.{i}: a sequence must hold at least one token")
        starts = self.starts()
        if len(starts) != len(self.sequences):
            raise ValueError(
                f"start: {len(starts)} entries for {len(self.sequences)} sequences"
            )
        for i, (s, seq) in enumerate(zip(starts, self.sequences, strict=True)):
            if not 0 <= s <= len(seq) - 1:
                raise ValueError(f"start.{i}: {s} is outside 0..{len(seq) - 1} (len(sequences.{i}) - 1)")
        return self

    def starts(self) -> list[int]:
        """The start position of every sequence."""
        if isinstance(self.start, int):
            return [self.start] * len(self.sequences)
        return list(self.start)


class SequenceScores(BaseModel):
    """Teacher distributions at positions `start .. L-1` of one sequence (n = L - start rows)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    start: int = Field(description="Position of the first row.")
    top_ids: Ids2D = Field(description="Top-k token ids per position, most likely first; shape (n, k).")
    top_logprobs: Floats2D = Field(description="Logprobs of top_ids; shape (n, k).")
    tail_logprob: Floats1D = Field(
        description="Log of the teacher's probability mass outside the top-k, computed from the full "
        "distribution (for the top-k tail completion); shape (n,). -inf is sent as the float minimum."
    )
    next_token_logprobs: Floats1D = Field(
        description="Logprob of the actual next token ids[p+1] for p = start .. L-2; shape (n-1,)."
    )
    token_logprobs: Floats2D | None = Field(
        None, description="Logprobs of the requested token_ids at every position; shape (n, len(token_ids))."
    )
    logprobs: Floats2D | None = Field(None, description="Full-vocabulary logprobs; shape (n, vocab).")


class ScoreResponse(BaseModel):
    model: str = Field(description="Name of the model that scored the request.")
    results: list[SequenceScores] = Field(description="One entry per request sequence, in order.")
    tail: TailKind = Field("exact", description=TAIL_DOC)
    tail_bound: float = Field(0.0, description="Absolute bound on the error of exp(tail_logprob); 0 when exact.")


class SessionCreateRequest(_Request):
    """Open an incremental-decoding session: the server keeps a KV cache of every row's prefix."""

    sequences: list[list[int]] = Field(min_length=1, description="Prompt token ids, one list per row.")
    top_k: int = Field(20, ge=1, description="Top-k returned at every step of this session.")
    logprob_dtype: LogprobDtype = Field("float32", description="Float type of the returned logprobs.")

    @model_validator(mode="after")
    def _non_empty(self) -> "SessionCreateRequest":
        for i, seq in enumerate(self.sequences):
            if not seq:
                raise ValueError(f"sequences.{i}: a sequence must hold at least one token")
        return self


class SessionExtendRequest(_Request):
    """Append tokens to some rows of a session and get their next-token distributions."""

    tokens: list[list[int]] = Field(
        min_length=1, description="New token ids, one non-empty list per entry of `rows`."
    )
    rows: list[int] | None = Field(
        None,
        description="Which rows the token lists belong to (finished rows are simply left out); "
        "default: every row of the session, in order.",
    )
    all_positions: bool = Field(
        False,
        description="Return the top-k after every new token, not only after each row's last one: the "
        "arrays then hold one entry per new token, row by row in the order of `rows`. Streams a "
        "rollout's teacher targets chunk by chunk while it is still being sampled.",
    )

    @model_validator(mode="after")
    def _aligned(self) -> "SessionExtendRequest":
        for i, toks in enumerate(self.tokens):
            if not toks:
                raise ValueError(f"tokens.{i}: each row needs at least one new token")
        if self.rows is not None:
            if len(self.rows) != len(self.tokens):
                raise ValueError(f"rows: {len(self.rows)} entries for {len(self.tokens)} token lists")
            if len(set(self.rows)) != len(self.rows):
                raise ValueError("rows: each row may appear once")
        return self


class SessionStep(BaseModel):
    """Next-token distributions of the listed rows after the latest tokens (after every new token
    with `all_positions`: then the arrays have one entry per new token, not per row)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    session_id: str = Field(description="Handle for extend and delete.")
    rows: list[int] = Field(description="Row indices the arrays below refer to, in order.")
    lengths: list[int] = Field(description="Prefix length of each listed row after this step.")
    top_ids: Ids2D = Field(description="Top-k next-token ids per row (per new token with all_positions); "
                           "shape (entries, k).")
    top_logprobs: Floats2D = Field(description="Logprobs of top_ids; shape (entries, k).")
    tail_logprob: Floats1D = Field(description="Log of the mass outside the top-k; shape (entries,).")
    tail: TailKind = Field("exact", description=TAIL_DOC)
    tail_bound: float = Field(0.0, description="Absolute bound on the error of exp(tail_logprob); 0 when exact.")


class ModelInfo(BaseModel):
    model: str = Field(description="Model name or path as loaded.")
    backend: str = Field(description="Backend serving the model (hf, sglang, vllm).")
    vocab_size: int = Field(description="Size of the logprob vectors (the model's output dimension).")
    tokenizer_fingerprint: str = Field(description="Hash of the vocabulary and special tokens.")
    max_context: int = Field(description="Longest sequence (prefix) accepted, in tokens.")
    max_top_k: int = Field(description="Largest top_k accepted.")
    full_logprobs: bool = Field(description="Whether full-vocabulary logprobs may be requested.")
    max_full_values: int = Field(description="Cap on positions x vocab in one full-logprobs response.")
    max_sequences: int = Field(description="Most sequences (rows) in one request.")
    max_tokens: int = Field(description="Most tokens in one request, summed over sequences.")
    dtype: str = Field(description="Dtype the model runs in (for an engine backend: the engine's own).")
    device: str = Field(description="Device the model runs on.")
    sessions: bool = Field(True, description="Whether /v1/sessions is served (per-token teacher queries: TRB's "
                           "warmup, fixed_eps, skd, teacher_warmup, sft_warmup and streamed targets need it).")
    token_ids: bool = Field(True, description="Whether `token_ids` scoring is served.")
    tail: TailKind = Field("exact", description=TAIL_DOC)
    tail_bound: float = Field(0.0, description="Absolute bound on the error of exp(tail_logprob); 0 when exact.")


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. session_not_found.")
    message: str = Field(description="What was wrong and how to fix it.")
    field: str | None = Field(None, description="The request field at fault, when there is one.")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ErrorCode:
    """Error codes a client may branch on."""

    INVALID_REQUEST = "invalid_request"
    MALFORMED_BODY = "malformed_body"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    SESSION_NOT_FOUND = "session_not_found"
    FULL_LOGPROBS_DISABLED = "full_logprobs_disabled"
    UNSUPPORTED = "unsupported"  # the backend cannot serve this kind of request (vLLM: no sessions)
    TOO_LARGE = "too_large"
    OVERLOADED = "overloaded"
    NOT_READY = "not_ready"
    ENGINE_UNAVAILABLE = "engine_unavailable"  # the inference engine behind the teacher is down: retry later
    QUARANTINED = "quarantined"  # the request crashed the model twice: never retry it
    UNAUTHORIZED = "unauthorized"
    INTERNAL = "internal"


def float_dtype(name: LogprobDtype) -> np.dtype:
    return np.dtype(np.float16 if name == "float16" else np.float32)
