"""What the SGLang and vLLM HTTP transports share: connecting with a Bearer key, waiting for the
engine's /health, and the reason out of an OpenAI-style error body."""

from __future__ import annotations

import time

import httpx


def error_message(resp: httpx.Response) -> str:
    """The engine's reason: `{"error": {"message": ...}}` for a refused request, `{"error": "..."}` for
    a missing API key (both engines) or a body that breaks SGLang's schema; else the raw text."""
    try:
        err = resp.json().get("error")
    except (ValueError, AttributeError):
        return resp.text[:500]
    return str(err.get("message") if isinstance(err, dict) else err)[:500]


def connect(url: str, api_key: str | None, timeout_s: float, ready_timeout_s: float, name: str,
            error: type[Exception]) -> httpx.Client:
    """A client for the engine at `url`, once its /health answers 200 (raises `error` after
    `ready_timeout_s`): SGLang answers 503 while it starts, vLLM listens only once its engine is up."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    client = httpx.Client(base_url=url, timeout=timeout_s, headers=headers)
    deadline = time.monotonic() + ready_timeout_s
    while not _healthy(client):
        if time.monotonic() > deadline:
            raise error(f"{name} at {url} was not healthy after {ready_timeout_s:.0f}s")
        time.sleep(0.2)
    return client


def _healthy(client: httpx.Client) -> bool:
    try:
        return client.get("/health", timeout=5.0).status_code == 200
    except httpx.TransportError:
        return False
