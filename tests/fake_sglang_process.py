"""`python tests/fake_sglang.py` as a child process on a free 127.0.0.1 port, with one torch thread."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from student_trainer.teacher.local import free_port

FAKE = Path(__file__).resolve().parent / "fake_sglang.py"
_OWN_KEY = object()  # generate()'s default: the key the fake was started with


class FakeSGLang:
    def __init__(self, model: Path, log: Path, *extra: str, key: str | None = None) -> None:
        self.url = f"http://127.0.0.1:{(port := free_port())}"
        self.key = key
        self._log = open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(FAKE), "--model", str(model), "--port", str(port), *extra,
             *(["--api-key", key] if key else [])],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})

    def requests(self) -> list[dict]:
        """What the fake was sent so far (its own route, no key needed)."""
        return httpx.get(f"{self.url}/fake/requests").json()

    def wait_up(self, timeout_s: float = 120) -> None:
        """Until it answers (on a route of its own, so /health still starts with its 503s)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.requests()
                return
            except httpx.TransportError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.2)

    def generate(self, body: dict, key: str | None | object = _OWN_KEY) -> httpx.Response:
        """POST /generate with the fake's own key, or `key` (None: no key at all)."""
        self.wait_up()  # a test may run alone, before anything else waited for the fake
        key = self.key if key is _OWN_KEY else key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.post(f"{self.url}/generate", json=body, headers=headers, timeout=30)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self._log.close()
