"""Checks of a parsed request against the model and the server's limits, naming the field at fault.

Pydantic checks the shape of a request; these check what only the server knows (vocabulary size,
context length, caps), before any work is queued, so a bad request costs nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

from shared.protocol import ErrorCode, ScoreRequest, SessionCreateRequest
from teacher_server.backends.base import BackendInfo
from teacher_server.errors import ApiError
from teacher_server.settings import ServerSettings

UNSUPPORTED = ErrorCode.UNSUPPORTED  # the backend cannot serve this kind of request (base.UnsupportedRequest)


def _invalid(field: str, message: str) -> ApiError:
    return ApiError(422, ErrorCode.INVALID_REQUEST, f"{field}: {message}", field)


def _too_large(field: str, message: str) -> ApiError:
    return ApiError(413, ErrorCode.TOO_LARGE, f"{field}: {message}", field)


def check_ids(field: str, ids: Sequence[int], vocab: int) -> None:
    for j, t in enumerate(ids):
        if not 0 <= t < vocab:
            raise _invalid(f"{field}.{j}", f"token id {t} is outside the vocabulary 0..{vocab - 1}")


def check_sequences(field: str, sequences: list[list[int]], info: BackendInfo, cfg: ServerSettings) -> None:
    if len(sequences) > cfg.max_sequences:
        raise _too_large(field, f"{len(sequences)} sequences exceed the limit of {cfg.max_sequences}")
    total = sum(len(s) for s in sequences)
    if total > cfg.max_tokens:
        raise _too_large(field, f"{total} tokens exceed the per-request limit of {cfg.max_tokens}")
    for i, seq in enumerate(sequences):
        if len(seq) > info.max_context:
            raise _invalid(f"{field}.{i}", f"length {len(seq)} exceeds the max context {info.max_context}")
        check_ids(f"{field}.{i}", seq, info.vocab_size)


def max_top_k(info: BackendInfo, cfg: ServerSettings) -> int:
    """The largest top_k served: the server's cap, the vocabulary and the backend's own cap."""
    return min(cfg.max_top_k, info.vocab_size, info.max_top_k or info.vocab_size)


def check_top_k(top_k: int, info: BackendInfo, cfg: ServerSettings) -> None:
    limit = max_top_k(info, cfg)
    if top_k > limit:
        raise _invalid("top_k", f"{top_k} exceeds the max top_k of {limit}")


def check_score(req: ScoreRequest, info: BackendInfo, cfg: ServerSettings) -> None:
    check_sequences("sequences", req.sequences, info, cfg)
    check_top_k(req.top_k, info, cfg)
    if req.token_ids is not None:
        check_ids("token_ids", req.token_ids, info.vocab_size)
        if req.token_ids and not info.supports_token_ids:
            raise ApiError(422, UNSUPPORTED, f"token_ids: the {info.backend} backend returns the top-k and the "
                           "next token's logprob only, not chosen ids at every position; ask for top_k", "token_ids")
    if req.full:
        if not info.supports_full:
            raise ApiError(422, UNSUPPORTED, f"full: the {info.backend} backend returns top-k logprobs only, "
                           "never the full vocabulary; ask for top_k and token_ids instead", "full")
        if not cfg.allow_full:
            raise ApiError(403, ErrorCode.FULL_LOGPROBS_DISABLED,
                           "full: this server does not return full logprobs (start it with --allow-full)", "full")
        positions = sum(len(s) - st for s, st in zip(req.sequences, req.starts(), strict=True))
        if positions * info.vocab_size > cfg.max_full_values:
            raise _too_large("full", f"{positions} positions x {info.vocab_size} vocab exceed the cap of "
                             f"{cfg.max_full_values} values; send fewer positions or use top_k")


def check_session_create(req: SessionCreateRequest, info: BackendInfo, cfg: ServerSettings) -> None:
    if not info.supports_sessions:
        raise ApiError(422, UNSUPPORTED, f"sessions: the {info.backend} backend does not serve decoding sessions "
                       "(each step would recompute the whole prefix: O(L^2)). Score finished sequences with "
                       "/v1/score; for methods that query the teacher at every token (TRB's warmup, fixed_eps, "
                       "skd, teacher_warmup, sft_warmup) serve the teacher with --backend hf or --backend sglang",
                       "sequences")
    check_sequences("sequences", req.sequences, info, cfg)
    check_top_k(req.top_k, info, cfg)
