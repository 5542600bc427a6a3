"""vLLM-compatible routes: `POST /v1/completions` (prompt-logprob scoring) and `GET /v1/models`.

A completions request becomes a /v1/score request on the same path: the same limits, fair scheduler,
quarantine, per-client accounting and metrics; only the parsing and the answer's shape differ
(`openai_compat.py`). Errors leave in vLLM's shape, `{"error": {"message", "type", "param", "code"}}`
with `code` the HTTP status, because OpenAI-style clients read that; `x-error-code` still carries our
code for the metrics.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pydantic_core
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from shared.protocol import ErrorCode
from teacher_server import limits
from teacher_server.deps import client_of, get_server, read_capped, run_queued
from teacher_server.errors import ApiError
from teacher_server.openai_compat import (
    CompatError,
    CompletionRequest,
    CompletionResponse,
    ModelList,
    check_request,
    completion_response,
    model_list,
    score_request,
)

if TYPE_CHECKING:
    from teacher_server.app import Server

router = APIRouter()
COMPAT_PATHS = ("/v1/completions", "/v1/models")
ERROR_TYPES = {400: "BadRequestError", 401: "UnauthorizedError", 404: "NotFoundError", 413: "BadRequestError",
               503: "ServiceUnavailableError"}


def vllm_error(status: int, code: str, message: str, param: str | None,
               headers: dict[str, str] | None = None) -> JSONResponse:
    """vLLM's ErrorResponse. Why 400 for our 422s: vLLM answers every invalid request 400."""
    status = 400 if status == 422 else status
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "InternalServerError"), "param": param,
                      "code": status}}
    return JSONResponse(body, status_code=status, headers={**(headers or {}), "x-error-code": code})


def _param(field: str | None, flat: bool) -> str | None:
    """Our field names as the client sent them: `sequences.0.3` -> `prompt.3` (one prompt) or `prompt.0.3`."""
    if field is None:
        return None
    if field == "top_k":
        return "prompt_logprobs"
    head, _, rest = field.partition(".")
    if head != "sequences":
        return field
    if flat and rest:
        rest = rest.partition(".")[2]
    return f"prompt.{rest}" if rest else "prompt"


@router.get("/v1/models", response_model=ModelList, summary="vLLM-compatible: the served model (as vLLM lists it).")
async def models(request: Request) -> Response:
    try:
        server = get_server(request)
    except ApiError as exc:
        return vllm_error(exc.status, exc.code, exc.message, exc.field, exc.headers)
    info = server.backend.info
    return JSONResponse(model_list(info.name, server.cfg.model, info.max_context).model_dump())


@router.post("/v1/completions", summary="vLLM-compatible prompt-logprob scoring of token ids (docs/interop.md).",
             responses={200: {"model": CompletionResponse}},
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": CompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")}}}})
async def completions(request: Request) -> Response:
    try:
        server = get_server(request)
        req = _parse(await read_capped(request, server.cfg.max_body_bytes))
        prompts = check_request(req)
        flat = not isinstance(req.prompt[0], list)
        info = server.backend.info
        if req.model is not None and req.model != info.name:
            raise CompatError("model", f"The model `{req.model}` does not exist. Valid aliases: {info.name}.", 404)
        k = info.vocab_size if req.prompt_logprobs == -1 else req.prompt_logprobs
        if k > (cap := limits.max_top_k(info, server.cfg)):
            raise CompatError("prompt_logprobs", f"Requested prompt logprobs of {k}, which is greater than max "
                              f"allowed: {cap}")
        score = score_request(prompts, k)
        try:
            limits.check_score(score, info, server.cfg)
        except ApiError as exc:
            raise CompatError(_param(exc.field, flat), exc.message.partition(": ")[2] or exc.message,
                              exc.status) from exc
        client = client_of(request)
        results = await run_queued(server, server.scheduler.score(client, score))
        server.metrics.tokens_scored.labels(client).inc(sum(len(s) for s in prompts))
        words = await _words(request, server)
        temperature = 1.0 if req.temperature is None else req.temperature
        # On a thread: an answer of 10^5 entries takes about a second of Python to build and encode, which
        # would otherwise hold every other client's request in the event loop.
        encoded = await asyncio.to_thread(lambda: pydantic_core.to_json(completion_response(
            info.name, prompts, results, k, temperature, req.seed, words.token, words.text, words.eos)))
        return Response(encoded, media_type="application/json")
    except CompatError as exc:
        code = ErrorCode.INVALID_REQUEST if exc.status in (400, 422) else (
            ErrorCode.TOO_LARGE if exc.status == 413 else "model_not_found")
        return vllm_error(exc.status, code, str(exc), exc.param)
    except ApiError as exc:
        return vllm_error(exc.status, exc.code, exc.message, _param(exc.field, False), exc.headers)


def _parse(body: bytes) -> CompletionRequest:
    try:
        return CompletionRequest.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors(include_input=False)[0]
        loc = ".".join(str(p) for p in first.get("loc", ())) or None
        if first.get("type") == "json_invalid":
            raise CompatError(None, f"the body is not valid JSON: {first.get('msg')}") from exc
        raise CompatError(loc, str(first.get("msg", "invalid value"))) from exc


class Words:
    """The tokenizer's text for token ids, loaded once per app on the first completions request.

    Why lazily and here: the backend (and its tokenizer) lives in a worker process, and only this route
    needs text (vLLM's `decoded_token` and the sampled token's `text`).
    """

    def __init__(self, model: str) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.eos = frozenset(t for t in [self.tokenizer.eos_token_id] if t is not None)
        self.token: Callable[[int], str | None] = functools.lru_cache(maxsize=1 << 18)(self._decode)

    def _decode(self, token: int) -> str | None:
        try:
            return self.tokenizer.decode([token])
        except (ValueError, IndexError, TypeError, OverflowError):  # an id the tokenizer does not hold
            return None

    def text(self, token: int) -> str:
        try:
            return self.tokenizer.decode([token], skip_special_tokens=True)
        except (ValueError, IndexError, TypeError, OverflowError):
            return ""


async def _words(request: Request, server: Server) -> Words:
    state: Any = request.app.state  # compat_words and compat_lock are set in create_app
    if state.compat_words is None:
        async with state.compat_lock:
            if state.compat_words is None:
                state.compat_words = await asyncio.to_thread(Words, server.cfg.model)
    return state.compat_words
