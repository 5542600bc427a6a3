"""`python tests/fake_vllm.py` as a child process on a free 127.0.0.1 port, with one torch thread."""

from __future__ import annotations

from pathlib import Path

import httpx
from fake_engine_process import OWN_KEY, FakeEngineProcess


class FakeVLLMProcess(FakeEngineProcess):
    SCRIPT = Path(__file__).resolve().parent / "fake_vllm.py"

    def complete(self, body: dict, key: str | None | object = OWN_KEY) -> httpx.Response:
        """POST /v1/completions with the fake's own key, or `key` (None: no key at all)."""
        return self.post("/v1/completions", body, key)

    def models(self) -> dict:
        self.wait_up()
        return httpx.get(f"{self.url}/v1/models", headers=self.headers(), timeout=10).json()


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
