"""`python tests/fake_sglang.py` as a child process on a free 127.0.0.1 port, with one torch thread."""

from __future__ import annotations

from pathlib import Path

import httpx
from fake_engine_process import OWN_KEY, FakeEngineProcess


class FakeSGLang(FakeEngineProcess):
    SCRIPT = Path(__file__).resolve().parent / "fake_sglang.py"

    def generate(self, body: dict, key: str | None | object = OWN_KEY) -> httpx.Response:
        """POST /generate with the fake's own key, or `key` (None: no key at all)."""
        return self.post("/generate", body, key, timeout=30)
