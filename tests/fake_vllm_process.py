"""`python tests/fake_vllm.py` as a child process on a free 127.0.0.1 port, with one torch thread."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from student_trainer.teacher.local import free_port

FAKE = Path(__file__).resolve().parent / "fake_vllm.py"


_OWN_KEY = object()  # complete()'s default: the key the fake was started with


class FakeVLLMProcess:
    def __init__(self, model: Path, log: Path, *extra: str, key: str | None = None, port: int | None = None) -> None:
        self.url = f"http://127.0.0.1:{(port := port or free_port())}"
        self.key = key
        self._log = open(log, "a")
        self.proc = subprocess.Popen(
            [sys.executable, str(FAKE), "--model", str(model), "--port", str(port), *extra,
             *(["--api-key", key] if key else [])],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})

    def wait_up(self, timeout_s: float = 120) -> FakeVLLMProcess:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                httpx.get(f"{self.url}/fake/requests", timeout=2)
                return self
            except httpx.TransportError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.2)

    def headers(self, key: str | None = None) -> dict[str, str]:
        key = key or self.key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def requests(self) -> list[dict]:
        """What the fake was sent so far (its own route, no key needed)."""
        return httpx.get(f"{self.url}/fake/requests", timeout=10).json()

    def complete(self, body: dict, key: str | None | object = _OWN_KEY) -> httpx.Response:
        """POST /v1/completions with the fake's own key, or `key` (None: no key at all)."""
        self.wait_up()
        headers = self.headers() if key is _OWN_KEY else self.headers(key) if key else {}
        return httpx.post(f"{self.url}/v1/completions", json=body, headers=headers, timeout=60)

    def models(self) -> dict:
        self.wait_up()
        return httpx.get(f"{self.url}/v1/models", headers=self.headers(), timeout=10).json()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self._log.close()


def assert_same_answers(ours: dict, theirs: dict, k: int, atol: float = 1e-5) -> None:
    """Two vLLM-shaped /v1/completions answers agree: choices, the sampled text (send temperature 0), and
    every prompt_logprobs entry key for key in order, logprobs within `atol`, ranks equal, except that an
    actual token outside the top-k may carry rank max(k, 1) + 1 on our side (the least it can be) where
    vLLM counts its exact rank."""
    assert len(ours["choices"]) == len(theirs["choices"])
    for mine, vllm in zip(ours["choices"], theirs["choices"], strict=True):
        assert mine["text"] == vllm["text"] and mine["finish_reason"] == vllm["finish_reason"]
        assert set(mine) >= set(vllm) and len(mine["prompt_logprobs"]) == len(vllm["prompt_logprobs"])
        for a, b in zip(mine["prompt_logprobs"], vllm["prompt_logprobs"], strict=True):
            if b is None:
                assert a is None
                continue
            assert list(a) == list(b)  # same keys, same order: the actual token first
            for key, e in b.items():
                assert a[key]["decoded_token"] == e["decoded_token"]
                assert abs(a[key]["logprob"] - e["logprob"]) <= atol, (key, a[key], e)
                assert a[key]["rank"] == e["rank"] or (e["rank"] > max(k, 1) and a[key]["rank"] == max(k, 1) + 1)
