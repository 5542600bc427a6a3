"""Request plumbing shared by the routes: body decoding, content negotiation, the server handle."""

from __future__ import annotations

import functools
import ipaddress
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from fastapi import Request, Response
from pydantic import BaseModel, ValidationError

from shared import codec
from shared.protocol import ErrorCode, ErrorResponse, float_dtype
from teacher_server.backends.base import EngineUnavailable
from teacher_server.errors import ApiError, from_validation_error
from teacher_server.quarantine import Quarantined
from teacher_server.scheduler import TIMING, Overloaded
from teacher_server.worker import WorkerDied

if TYPE_CHECKING:
    from teacher_server.app import Server

M = TypeVar("M", bound=BaseModel)
MAX_CLIENT_LABEL = 64


def client_of(request: Request) -> str:
    """Who a request is charged to in the fair scheduler (its standing), and its metrics label.

    With API keys, the key's name. Without keys, X-Client-Id is taken at its word only from a loopback
    peer: such a caller is a process on the server's own machine, which could stop or starve the
    server anyway, and several experiments on one machine have no other name to tell them apart.
    From any other peer the standing is its address, whatever id it declares, so a caller cannot
    rotate ids to get a fresh zero-use standing each time (clients behind one NAT or proxy share it).
    """
    named = getattr(request.state, "key_name", None)
    if named:
        return named
    host = request.client.host if request.client else ""
    if _loopback(host):
        return (request.headers.get("x-client-id") or "anonymous")[:MAX_CLIENT_LABEL]
    return f"peer:{host}"[:MAX_CLIENT_LABEL]


def is_loopback(peer: tuple[str, int] | list | None) -> bool:
    """Whether an ASGI scope's `client` (host, port) is on this machine."""
    return bool(peer) and _loopback(str(peer[0]))


@functools.lru_cache(maxsize=1024)
def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "testclient"  # Starlette's in-process test client


async def read_capped(request: Request, limit: int) -> bytes:
    """The request body, refusing more than `limit` bytes before holding them in memory."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, ErrorCode.TOO_LARGE, f"body: {declared} bytes exceed the limit of {limit}", "body")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, ErrorCode.TOO_LARGE, f"body: more than the limit of {limit} bytes", "body")
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_body(request: Request, model_type: type[M], limit: int) -> M:
    """Decode a JSON or msgpack body into `model_type`, answering 4xx on anything malformed."""
    media = codec.media_type_of(request.headers.get("content-type"))
    if media is None:
        raise ApiError(415, ErrorCode.UNSUPPORTED_MEDIA_TYPE,
                       f"Content-Type must be {codec.JSON} or {codec.MSGPACK}")
    body = await read_capped(request, limit)
    try:
        return codec.decode(body, model_type, media)
    except codec.CodecError as exc:
        raise ApiError(400, ErrorCode.MALFORMED_BODY, str(exc)) from exc
    except ValidationError as exc:
        raise from_validation_error(exc) from exc


def respond(request: Request, model: BaseModel) -> Response:
    """Encode with msgpack when the client accepts it, JSON otherwise."""
    accept = request.headers.get("accept", "")
    media = codec.MSGPACK if "msgpack" in accept else codec.JSON
    response = Response(codec.encode(model, media), media_type=media)
    if (timing := TIMING.get()) is not None:  # queue wait and model time of this request, in ms
        response.headers["server-timing"] = f"queue;dur={timing[0] * 1e3:.2f}, model;dur={timing[1] * 1e3:.2f}"
    return response


def cast_floats(model: M, dtype_name: str) -> M:
    """Cast every float array of a response to the requested dtype (float16 halves the bytes)."""
    dtype = float_dtype(dtype_name)  # type: ignore[arg-type]
    finfo = np.finfo(dtype)
    for name, value in model:
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            clean = np.nan_to_num(value, nan=np.nan, neginf=finfo.min, posinf=finfo.max)
            setattr(model, name, clean.astype(dtype, copy=False))
    return model


def body_doc(model_type: type[BaseModel], description: str) -> dict[str, Any]:
    """OpenAPI description of a request body accepted as JSON or msgpack."""
    schema = model_type.model_json_schema(ref_template="#/components/schemas/{model}")
    return {"requestBody": {"required": True, "description": description, "content": {
        codec.JSON: {"schema": schema}, codec.MSGPACK: {"schema": schema}}}}


ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 413, 415, 422, 429, 503)}


def get_server(request: Request) -> Server:
    server: Server | None = request.app.state.server
    if server is None:
        failed = request.app.state.startup_error
        message = (f"the backend failed to start: {failed}" if failed else
                   "the backend is starting (loading the model, or waiting for its engine to answer)")
        raise ApiError(503, ErrorCode.NOT_READY, message, headers={"Retry-After": "2"})
    return server


async def run_queued(server: Server, coro: Any) -> Any:
    """Await a scheduler call, turning a full queue into 503 + Retry-After."""
    try:
        return await coro
    except Overloaded as exc:
        raise ApiError(503, ErrorCode.OVERLOADED, str(exc), headers={"Retry-After": "1"}) from exc
    except Quarantined as exc:  # 4xx: clients retry 503s, and this one would crash the model again
        raise ApiError(422, ErrorCode.QUARANTINED, str(exc)) from exc
    except WorkerDied as exc:  # a new worker is already serving: the retry will be answered
        raise ApiError(503, ErrorCode.NOT_READY, str(exc), headers={"Retry-After": "1"}) from exc
    except EngineUnavailable as exc:  # the engine restarts; /ready says when it answers again
        server.engine_health.mark_down(str(exc))
        raise ApiError(503, ErrorCode.ENGINE_UNAVAILABLE, str(exc), headers={"Retry-After": "2"}) from exc
