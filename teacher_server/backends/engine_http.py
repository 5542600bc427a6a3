"""What the SGLang and vLLM HTTP transports share: connecting with a Bearer key, waiting for the
engine's /health, calls that tell a dead engine (503, retried) from a refused request, and the reason
out of an OpenAI-style error body."""

from __future__ import annotations

import logging
import time
from typing import Any

import httpx
from pydantic_core import from_json

from teacher_server.backends.base import EngineUnavailable

log = logging.getLogger("teacher_server.engine")
REPORT_EVERY_S = 15.0  # while waiting for an engine to start, say so this often


def error_message(resp: httpx.Response) -> str:
    """The engine's reason: `{"error": {"message": ...}}` for a refused request, `{"error": "..."}` for
    a missing API key (both engines) or a body that breaks SGLang's schema; else the raw text."""
    try:
        err = resp.json().get("error")
    except (ValueError, AttributeError):
        return resp.text[:500]
    return str(err.get("message") if isinstance(err, dict) else err)[:500]


def json_body(resp: httpx.Response) -> Any:
    """An engine's JSON answer as plain Python objects, parsed by pydantic_core rather than by
    `resp.json()`'s `json.loads`, which takes twice as long or more on the megabytes of logprobs an
    engine sends (1.4 MB of vLLM top-20: 16 ms against 35). Raises ValueError on malformed JSON."""
    return from_json(resp.content)


def connect(url: str, api_key: str | None, timeout_s: float, ready_timeout_s: float, name: str,
            error: type[Exception]) -> httpx.Client:
    """A client for the engine at `url`, once its /health answers 200 (raises `error` after
    `ready_timeout_s`, the teacher's `engine_wait_s`): SGLang answers 503 while it starts, vLLM
    refuses connections until its engine is up. The teacher already listens meanwhile (/ready 503)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    client = httpx.Client(base_url=url, timeout=timeout_s, headers=headers)
    started = time.monotonic()
    next_report = started + REPORT_EVERY_S
    while not healthy(client):
        now = time.monotonic()
        if now - started > ready_timeout_s:
            client.close()
            raise error(f"{name} at {url} was not healthy after {ready_timeout_s:.0f}s (engine_wait_s)")
        if now >= next_report:
            log.info("waiting for %s at %s to answer /health (%.0fs of %.0fs)", name, url, now - started,
                     ready_timeout_s)
            next_report = now + REPORT_EVERY_S
        time.sleep(0.2)
    return client


def healthy(client: httpx.Client) -> bool:
    try:
        return client.get("/health", timeout=5.0).status_code == 200
    except httpx.TransportError:
        return False


def call(client: httpx.Client, method: str, path: str, name: str, **kwargs: Any) -> httpx.Response:
    """One call to the engine. A connection failure, or a 5xx while its /health fails too, means the
    engine is down (crashed, restarting): `EngineUnavailable`, which clients get as a 503 to retry. Any
    other answer is returned for the caller to judge."""
    try:
        resp = client.request(method, path, **kwargs)
    except httpx.TransportError as exc:
        raise EngineUnavailable(f"{name} at {client.base_url} did not answer ({type(exc).__name__}): it is down "
                                "or restarting; retry once /ready answers 200") from exc
    if resp.status_code >= 500 and not healthy(client):
        raise EngineUnavailable(f"{name} at {client.base_url} answered {resp.status_code} and its /health fails: "
                                "it is down or restarting; retry once /ready answers 200")
    return resp
