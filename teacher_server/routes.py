"""HTTP routes: parse, check limits, queue the work, encode. Nothing else happens here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from shared.protocol import (
    ErrorCode,
    ModelInfo,
    ScoreRequest,
    ScoreResponse,
    SessionCreateRequest,
    SessionExtendRequest,
    SessionStep,
)
from teacher_server import limits
from teacher_server.backends.base import StepArrays
from teacher_server.deps import (
    ERRORS,
    body_doc,
    cast_floats,
    client_of,
    get_server,
    parse_body,
    respond,
    run_queued,
)
from teacher_server.errors import ApiError
from teacher_server.sessions import Session, SessionNotFound
from teacher_server.worker import SessionLost

if TYPE_CHECKING:
    from teacher_server.app import Server

router = APIRouter()


@router.get("/health", summary="Liveness: the process answers.")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready", summary="Readiness: the model is loaded and its engine (if any) answers; no key needed.",
            responses={503: ERRORS[503]})
async def ready(request: Request) -> dict[str, str]:
    server = get_server(request)  # 503 while the backend starts, with the reason
    if not server.backend.ready:
        raise ApiError(503, ErrorCode.NOT_READY, "the model process is down and being restarted",
                       headers={"Retry-After": "5"})
    if why := await server.engine_health.down():
        raise ApiError(503, ErrorCode.ENGINE_UNAVAILABLE, why, headers={"Retry-After": "2"})
    return {"status": "ready"}


@router.get("/v1/model", response_model=ModelInfo, summary="The served model and the server's limits.")
async def model_info(request: Request) -> ModelInfo:
    return get_server(request).model_info()


@router.post("/v1/score", summary="Teacher logprobs at every position of token sequences.",
             responses={200: {"model": ScoreResponse}, **ERRORS},
             openapi_extra=body_doc(ScoreRequest, "Sequences to score; JSON or msgpack."))
async def score(request: Request) -> Response:
    server = get_server(request)
    req = await parse_body(request, ScoreRequest, server.cfg.max_body_bytes)
    limits.check_score(req, server.backend.info, server.cfg)
    client = client_of(request)
    results = await run_queued(server, server.scheduler.score(client, req))
    server.metrics.tokens_scored.labels(client).inc(sum(len(s) for s in req.sequences))
    info = server.backend.info
    body = ScoreResponse(model=info.name, results=[cast_floats(r, req.logprob_dtype) for r in results],
                         tail="bounded" if info.tail_bound else "exact", tail_bound=info.tail_bound)
    return respond(request, body)


def _step(session_id: str, step: StepArrays, rows: list[int], lengths: list[int], dtype: str,
          tail_bound: float) -> SessionStep:
    out = SessionStep(session_id=session_id, rows=rows, lengths=[lengths[r] for r in rows],
                      top_ids=step.top_ids, top_logprobs=step.top_logprobs, tail_logprob=step.tail_logprob,
                      tail="bounded" if tail_bound else "exact", tail_bound=tail_bound)
    return cast_floats(out, dtype)


@router.post("/v1/sessions", summary="Open a decoding session (KV cache kept on the server).",
             responses={200: {"model": SessionStep}, **ERRORS},
             openapi_extra=body_doc(SessionCreateRequest, "Prompts of the rows; JSON or msgpack."))
async def create_session(request: Request) -> Response:
    server = get_server(request)
    req = await parse_body(request, SessionCreateRequest, server.cfg.max_body_bytes)
    limits.check_session_create(req, server.backend.info, server.cfg)
    client = client_of(request)
    tokens = sum(len(s) for s in req.sequences)
    state, step = await run_queued(server, server.scheduler.open_session(client, req.sequences, req.top_k))
    server.metrics.tokens_scored.labels(client).inc(tokens)
    if state.nbytes > server.cfg.max_session_bytes:
        raise ApiError(413, ErrorCode.TOO_LARGE, f"sequences: the session needs {state.nbytes} bytes, over the "
                       f"cap of {server.cfg.max_session_bytes}", "sequences")
    session = server.sessions.add(state, req.top_k, client, req.logprob_dtype)
    server.refresh_gauges()
    rows = list(range(len(req.sequences)))
    return respond(request, _step(session.id, step, rows, state.lengths, req.logprob_dtype,
                                  server.backend.info.tail_bound))


@router.post("/v1/sessions/{session_id}/extend", summary="Append tokens to rows; next-token top-k per row.",
             responses={200: {"model": SessionStep}, **ERRORS},
             openapi_extra=body_doc(SessionExtendRequest, "New tokens per row; JSON or msgpack."))
async def extend_session(session_id: str, request: Request) -> Response:
    server = get_server(request)
    req = await parse_body(request, SessionExtendRequest, server.cfg.max_body_bytes)
    session = _lookup(server, session_id)
    state, info = session.state, server.backend.info
    rows = req.rows if req.rows is not None else list(range(len(state.lengths)))
    if len(rows) != len(req.tokens):
        raise ApiError(422, ErrorCode.INVALID_REQUEST, f"tokens: {len(req.tokens)} lists for {len(rows)} rows",
                       "tokens")
    for i, (row, toks) in enumerate(zip(rows, req.tokens, strict=True)):
        if not 0 <= row < len(state.lengths):
            raise ApiError(422, ErrorCode.INVALID_REQUEST,
                           f"rows.{i}: row {row} is outside 0..{len(state.lengths) - 1}", f"rows.{i}")
        limits.check_ids(f"tokens.{i}", toks, info.vocab_size)
        if state.lengths[row] + len(toks) > info.max_context:
            raise ApiError(422, ErrorCode.INVALID_REQUEST,
                           f"tokens.{i}: row {row} would exceed the max context {info.max_context}", f"tokens.{i}")
    client, tokens = client_of(request), sum(len(t) for t in req.tokens)
    try:
        step = await run_queued(server, server.scheduler.extend_session(
            client, state, rows, req.tokens, session.top_k, req.all_positions))
    except SessionLost as exc:  # the model worker restarted since this session opened
        server.sessions.discard(session_id)
        raise _not_found(session_id) from exc
    server.metrics.tokens_scored.labels(client).inc(tokens)
    server.sessions.enforce_caps(keep=session_id)
    server.refresh_gauges()
    return respond(request, _step(session_id, step, rows, state.lengths, session.logprob_dtype, info.tail_bound))


@router.delete("/v1/sessions/{session_id}", summary="Close a session and free its cache.",
               responses={404: ERRORS[404]})
async def delete_session(session_id: str, request: Request) -> JSONResponse:
    server = get_server(request)
    try:
        server.sessions.remove(session_id)
    except SessionNotFound as exc:
        raise _not_found(session_id) from exc
    server.refresh_gauges()
    return JSONResponse({"deleted": session_id})


@router.get("/metrics", summary="Prometheus metrics.", response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    server = get_server(request)
    server.sessions.sweep()
    server.refresh_gauges()
    return Response(server.metrics.render(), media_type="text/plain; version=0.0.4")


def _lookup(server: Server, session_id: str) -> Session:
    try:
        return server.sessions.get(session_id)
    except SessionNotFound as exc:
        raise _not_found(session_id) from exc


def _not_found(session_id: str) -> ApiError:
    return ApiError(404, ErrorCode.SESSION_NOT_FOUND,
                    f"session {session_id!r} is unknown or expired; open a new one from the full prefixes")
