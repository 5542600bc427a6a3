"""Whether the inference engines behind the teacher (SGLang, vLLM servers) answer, for /ready.

An engine can die and come back while the teacher stays up (a crash, an operator's restart). The
teacher then answers 503 `engine_unavailable` to the requests that fail, and /ready turns 503 until
the engine's own /health answers 200 again, so orchestrators and trainers see the outage and its end.
"""

from __future__ import annotations

import time

import httpx

PROBE_TTL_S = 1.0  # a verdict is reused this long: /ready may be polled often, the engine need not be


class EngineHealth:
    def __init__(self, urls: tuple[str, ...], ttl_s: float = PROBE_TTL_S) -> None:
        self.urls, self.ttl_s = urls, ttl_s
        self._verdict: str | None = None
        self._checked = float("-inf")
        self._http: httpx.AsyncClient | None = None

    def mark_down(self, why: str) -> None:
        """A request just failed on the engine: /ready says so until a probe finds it up again."""
        if self.urls:
            self._verdict, self._checked = why, time.monotonic()

    async def down(self) -> str | None:
        """None when every engine answers /health with 200, else why not."""
        if not self.urls or time.monotonic() - self._checked < self.ttl_s:
            return self._verdict
        self._http = self._http or httpx.AsyncClient(timeout=2.0)
        verdict = None
        for url in self.urls:
            try:
                status = (await self._http.get(f"{url}/health")).status_code
                if status != 200:
                    verdict = f"the engine at {url} answers /health with {status} (starting or unhealthy)"
            except httpx.TransportError as exc:
                verdict = f"the engine at {url} does not answer ({type(exc).__name__}): it is down or restarting"
            if verdict:
                break
        self._verdict, self._checked = verdict, time.monotonic()
        return verdict

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
