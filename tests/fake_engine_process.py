"""A protocol-faithful fake engine (tests/fake_vllm.py, tests/fake_sglang.py) as a child process on a
127.0.0.1 port, with one torch thread; the subclasses add the engine's own routes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from student_trainer.teacher.local import free_port

OWN_KEY = object()  # a request's default key: the one the fake was started with


class FakeEngineProcess:
    SCRIPT: Path  # the fake server's file

    def __init__(self, model: Path, log: Path, *extra: str, key: str | None = None, port: int | None = None) -> None:
        self.url = f"http://127.0.0.1:{(port := port or free_port())}"
        self.key = key
        self._log = open(log, "a")
        self.proc = subprocess.Popen(
            [sys.executable, str(self.SCRIPT), "--model", str(model), "--port", str(port), *extra,
             *(["--api-key", key] if key else [])],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})

    def requests(self) -> list[dict]:
        """What the fake was sent so far (its own route, no key needed)."""
        return httpx.get(f"{self.url}/fake/requests", timeout=10).json()

    def wait_up(self, timeout_s: float = 120) -> FakeEngineProcess:
        """Until it answers, on its own route (so an engine's /health can still start with its 503s)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.requests()
                return self
            except httpx.TransportError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.2)

    def headers(self, key: str | None | object = OWN_KEY) -> dict[str, str]:
        """The Authorization header for the fake's own key, or for `key` (None: no header)."""
        key = self.key if key is OWN_KEY else key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def post(self, path: str, body: dict, key: str | None | object = OWN_KEY, timeout: float = 60) -> httpx.Response:
        self.wait_up()  # a test may run alone, before anything else waited for the fake
        return httpx.post(f"{self.url}{path}", json=body, headers=self.headers(key), timeout=timeout)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self._log.close()
