"""The FastAPI app: lifespan builds the backend and the scheduler, routes stay thin.

Routes live in `routes.py`, request plumbing (body decoding, content negotiation) in `deps.py`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.protocol import ErrorCode, ModelInfo
from teacher_server import limits
from teacher_server.auth import key_name, load_keys
from teacher_server.backends.base import Backend
from teacher_server.backends.factory import load_backend
from teacher_server.compat_routes import COMPAT_PATHS, vllm_error
from teacher_server.compat_routes import router as compat_router
from teacher_server.deps import client_of, is_loopback
from teacher_server.engine_health import EngineHealth
from teacher_server.errors import error_response, install_error_handlers
from teacher_server.metrics import Metrics
from teacher_server.quarantine import Quarantine
from teacher_server.routes import router
from teacher_server.scheduler import FairScheduler
from teacher_server.sessions import SessionStore
from teacher_server.settings import ServerSettings

log = logging.getLogger("teacher_server")
OPEN_PATHS = ("/health", "/ready")  # probes for orchestrators and health checks: they reveal no data

# At shutdown uvicorn has given requests `shutdown_grace_s` to finish, then cut them off; a model call
# still running belongs to no one, so the worker gets this long to answer before it is killed.
ORPHAN_GRACE_S = 5.0


def build_backend(cfg: ServerSettings) -> Backend:
    """The configured backend, in a worker process unless `model_process` is off (see `worker.py`)."""
    if not cfg.model_process:
        return load_backend(cfg)
    from teacher_server.worker import ProcessBackend

    return ProcessBackend(functools.partial(load_backend, cfg), deadline_s=cfg.forward_deadline_s or None,
                          deadline_per_token_s=cfg.forward_deadline_per_token_s, grace_s=ORPHAN_GRACE_S)


class Server:
    """Everything the routes need, built once in the lifespan and stored on `app.state.server`."""

    def __init__(self, cfg: ServerSettings, backend: Backend) -> None:
        self.cfg, self.backend, self.metrics = cfg, backend, Metrics()
        self.scheduler = FairScheduler(backend, cfg.max_queue, cfg.batch_tokens,
                                       on_charge=lambda c, s: self.metrics.model_seconds.labels(c).inc(s),
                                       quarantine=Quarantine(cfg.quarantine_s))
        self.sessions = SessionStore(cfg.session_ttl_s, cfg.max_sessions, cfg.max_session_bytes)
        self.engine_health = EngineHealth(backend.info.engine_urls)

    def model_info(self) -> ModelInfo:
        i, c = self.backend.info, self.cfg
        return ModelInfo(model=i.name, backend=i.backend, vocab_size=i.vocab_size,
                         tokenizer_fingerprint=i.tokenizer_fingerprint, max_context=i.max_context,
                         max_top_k=limits.max_top_k(i, c), full_logprobs=c.allow_full and i.supports_full,
                         max_full_values=c.max_full_values, max_sequences=c.max_sequences,
                         max_tokens=c.max_tokens, dtype=i.dtype, device=i.device, sessions=i.supports_sessions,
                         token_ids=i.supports_token_ids, tail="bounded" if i.tail_bound else "exact",
                         tail_bound=i.tail_bound)

    def refresh_gauges(self) -> None:
        self.metrics.queue_depth.set(self.scheduler.depth)
        self.metrics.active_sessions.set(len(self.sessions))
        self.metrics.cache_bytes.set(self.sessions.nbytes)
        self.metrics.quarantined.set(self.scheduler.quarantine.total)
        self.metrics.restarts.set(getattr(self.backend, "restarts", 0))
        self.metrics.busy.set(int(self.scheduler.busy))
        self.metrics.hung.set(getattr(self.backend, "hung", 0))


class Gatekeeper:
    """API keys and request metrics in one plain ASGI layer.

    Why not two `@app.middleware("http")` functions: each of those wraps the request in its own
    task and body stream, which cost ~20% of the server's CPU on small requests (docs/performance.md).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, request = time.perf_counter(), Request(scope)
        status, error_code = 500, None

        async def watch(message: Message) -> None:
            nonlocal status, error_code
            if message["type"] == "http.response.start":
                status = message["status"]
                error_code = dict(message.get("headers") or []).get(b"x-error-code")
            await send(message)

        try:
            state = scope["app"].state
            if state.keys and scope["path"] not in OPEN_PATHS:
                name = key_name(state.keys, request.headers.get("authorization"), request.headers.get("x-api-key"))
                if name is None and not _keyless(state, scope, request):
                    await _unauthorized(scope["path"])(scope, receive, watch)
                    return
                if name is not None:
                    request.state.key_name = name
            await self.app(scope, receive, watch)
        finally:
            server: Server | None = scope["app"].state.server
            if server is not None:
                route = scope.get("route")
                path = route.path if route is not None else "<unmatched>"  # bounded label set
                client = client_of(request)
                server.metrics.requests.labels(path, client, str(status)).inc()
                server.metrics.latency.labels(path).observe(time.perf_counter() - started)
                if status >= 400:
                    code = error_code.decode() if error_code else str(status)
                    server.metrics.errors.labels(path, client, code).inc()


def _keyless(state: Any, scope: Scope, request: Request) -> bool:
    """The vLLM-compatible routes answer a loopback peer that presents no key, when the operator said so
    (`compat_keyless_loopback`): TRL's AsyncDistillationTrainer sends no credentials at all."""
    return (state.compat_keyless and scope["path"] in COMPAT_PATHS and is_loopback(scope.get("client"))
            and not request.headers.get("authorization") and not request.headers.get("x-api-key"))


def _unauthorized(path: str) -> Response:
    message = "a valid API key is required (Authorization: Bearer <key>, or Basic with the key as password)"
    headers = {"WWW-Authenticate": "Bearer"}
    if path in COMPAT_PATHS:  # in the shape OpenAI-style clients read
        return vllm_error(401, ErrorCode.UNAUTHORIZED, message, None, headers)
    return error_response(401, ErrorCode.UNAUTHORIZED, message, headers=headers)


def _load_in_background(factory: Callable[[ServerSettings], Backend], cfg: ServerSettings) -> asyncio.Future:
    """Build the backend on a daemon thread, so that the server listens (and answers /ready 503) while a
    model loads or an engine starts, and a SIGTERM stops it at any moment: the lifespan's shutdown does
    not wait for the thread, and the loading worker process is killed (`_stop_loading`)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()

    def settle(setter: Callable, value: object) -> None:
        try:
            loop.call_soon_threadsafe(lambda: done.done() or setter(value))
        except RuntimeError:  # the loop closed first: the server is gone, so is this backend's use
            if isinstance(value, Backend):
                value.close()

    def run() -> None:
        try:
            settle(done.set_result, factory(cfg))
        except BaseException as exc:  # noqa: BLE001 - reported by the lifespan, which stops the server
            settle(done.set_exception, exc)

    threading.Thread(target=run, name="teacher-load", daemon=True).start()
    return done


def _stop_loading() -> None:
    """Shutdown during startup: kill the model process still loading (it may wait on an engine)."""
    for child in multiprocessing.active_children():
        child.kill()


def create_app(cfg: ServerSettings, backend_factory: Callable[[ServerSettings], Backend] = build_backend,
               exit_on_failure: bool = False) -> FastAPI:
    """The app; its backend loads after the server listens (/ready answers 503 until then, with the
    reason). `exit_on_failure`: a backend that cannot start stops the process (the CLI's choice; in
    process, the failure stays on /ready)."""
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = _load_in_background(backend_factory, cfg)

        async def serve_when_loaded() -> None:
            try:
                backend = await loading
            except Exception as exc:  # noqa: BLE001 - the server cannot serve: stop it, exit non-zero
                app.state.startup_error = f"{type(exc).__name__}: {exc}"
                log.error("the teacher could not start its backend: %s", app.state.startup_error)
                if exit_on_failure:  # uvicorn's own shutdown; the CLI then exits with status 1
                    os.kill(os.getpid(), signal.SIGTERM)
                return
            server = Server(cfg, backend)
            server.scheduler.start()
            app.state.server = server
            log.info("the backend is ready: %s (%s)", backend.info.name, backend.info.backend)

        starter = asyncio.create_task(serve_when_loaded())
        try:
            yield
        finally:
            server = app.state.server
            if server is None:  # stopped while loading
                starter.cancel()
                _stop_loading()
                loading.add_done_callback(lambda f: f.cancelled() or f.exception() or f.result().close())
            else:
                await server.scheduler.stop()
                await server.engine_health.aclose()
                await asyncio.to_thread(server.backend.close)

    app = FastAPI(title="TRB teacher server", version="0.1.0", lifespan=lifespan,
                  description="Next-token logprobs of a frozen teacher LM, for on-policy distillation.")
    app.state.server = None
    app.state.startup_error = None
    app.state.keys = load_keys(cfg.api_keys, cfg.api_keys_file, cfg.shared_key_file, os.environ.get("TRB_API_KEY"))
    app.state.compat_keyless = cfg.compat_keyless_loopback
    app.state.compat_words, app.state.compat_lock = None, asyncio.Lock()  # the tokenizer of compat_routes.Words
    install_error_handlers(app)

    app.add_middleware(Gatekeeper)
    app.include_router(router)
    app.include_router(compat_router)
    return app
