"""How calls reach vLLM: its OpenAI-compatible HTTP server (`vllm serve`), never its Python API.

The backend needs three things from it: the `prompt_logprobs` of a batch of token-id prompts
(`POST /v1/completions`), the longest model length (`GET /v1/models`, `max_model_len`), and the cap
on `prompt_logprobs` (`--max-logprobs`, which no route reports: it is probed once at startup). Every
vLLM behaviour relied on here is listed, with its source file, in docs/vllm.md.
"""

from __future__ import annotations

import base64
import re
from typing import Any, TypedDict

import numpy as np

from teacher_server.backends.engine_http import call, connect, error_message, json_body

MAX_PROMPTS = 1024  # prompts per /v1/completions call (vLLM's VLLM_MAX_COMPLETION_PROMPTS default)
DEFAULT_MAX_LOGPROBS = 20  # vLLM's --max-logprobs default, assumed when the probe's answer cannot be read
_CAP = re.compile(r"greater than max allowed: (\d+)")
_DTYPE = re.compile(r"dtype=torch\.(\w+)")


class VLLMError(RuntimeError):
    """vLLM refused a call, or answered something that breaks the documented alignment."""


class Entry(TypedDict):
    """One token of a `prompt_logprobs` position: vLLM's `Logprob` (decoded_token is not read).

    A plain dict, as parsed: the backend checks what it reads (vllm.split_entry). Validating the
    thousands of entries of a batch into models took several times as long as parsing them."""

    logprob: float
    rank: int | None


Position = dict[str, Entry] | None  # token id (a string key, from json.dumps of int keys) -> entry


def pooling_body(model: str, prompts: list[list[int]]) -> dict[str, Any]:
    """Every position's final hidden state, unnormalised (`use_activation: false`: the default
    L2-normalises the rows and loses their scale), as base64 float32."""
    return {"model": model, "input": prompts, "task": "token_embed", "use_activation": False,
            "encoding_format": "base64", "embed_dtype": "float32", "endianness": "little"}


def completion_body(model: str, prompts: list[list[int]], k: int) -> dict[str, Any]:
    """One batched call. max_tokens 1: vLLM refuses 0 and generates at least one token; prompt logprobs
    ignore every sampling setting, so none is sent (the generated token is thrown away)."""
    return {"model": model, "prompt": prompts, "max_tokens": 1, "prompt_logprobs": k}


class HTTPTransport:
    """A running `vllm serve` through a synchronous client (the backend runs on the scheduler's thread).

    `api_key` is the server's `--api-key`, sent as `Authorization: Bearer ...` on every call (vLLM
    guards /v1, so /v1/models too, and lets /health through). It lives in the client's headers only.
    """

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 600.0,
                 ready_timeout_s: float = 600.0) -> None:
        self.url = url.rstrip("/")
        self.client = connect(self.url, api_key, timeout_s, ready_timeout_s, "vLLM", VLLMError)
        resp = call(self.client, "GET", "/v1/models", "vLLM")
        if resp.status_code != 200:
            hint = " (is vLLM started with --api-key? set TRB_TEACHER_VLLM_API_KEY or --vllm-api-key-file)"
            raise VLLMError(f"vLLM /v1/models answered {resp.status_code}: {error_message(resp)}"
                            + (hint if resp.status_code == 401 else ""))
        card = resp.json()["data"][0]  # the base model; LoRA adapters follow it
        self.model: str = card["id"]
        self.max_model_len: int = int(card["max_model_len"])
        self.pooling = self._is_pooling_runner()
        self.launch_dtype = self._launch_dtype()

    def _is_pooling_runner(self) -> bool:
        """A pooling runner (`--runner pooling`) answers /pooling and no /v1/completions; a generate
        server answers /pooling 404. One token of pooling is the probe: nothing is kept."""
        resp = call(self.client, "POST", "/pooling", "vLLM", json=pooling_body(self.model, [[0]]))
        return resp.status_code == 200

    def _launch_dtype(self) -> str | None:
        """vLLM's model dtype from /server_info, which only VLLM_SERVER_DEV_MODE=1 serves; else None."""
        resp = call(self.client, "GET", "/server_info", "vLLM")
        if resp.status_code != 200:
            return None
        found = _DTYPE.search(resp.text)
        return found.group(1) if found else None

    def hidden_states(self, prompts: list[list[int]]) -> list[np.ndarray]:
        """The final hidden state (the lm_head's input) at every position of each prompt: (L_i, H) float32,
        row j after prompt[:j+1]. Sent back as raw little-endian float32 (`encoding_format: bytes` is not
        used: its layout lives in a header; base64 costs 4/3 of it and parses in numpy at once)."""
        resp = call(self.client, "POST", "/pooling", "vLLM", json=pooling_body(self.model, prompts))
        if resp.status_code != 200:
            raise VLLMError(f"vLLM /pooling answered {resp.status_code}: {error_message(resp)}")
        data = sorted(json_body(resp).get("data") or [], key=lambda d: d.get("index", 0))
        if len(data) != len(prompts):
            raise VLLMError(f"vLLM /pooling answered {len(data)} results for a batch of {len(prompts)}")
        out = []
        for d, prompt in zip(data, prompts, strict=True):
            flat = np.frombuffer(base64.b64decode(d["data"]), dtype="<f4")
            if len(flat) % len(prompt):
                raise VLLMError(f"vLLM /pooling returned {len(flat)} floats for a prompt of {len(prompt)} tokens")
            out.append(flat.reshape(len(prompt), -1))
        return out

    def max_logprobs(self, vocab_size: int) -> int:
        """vLLM's cap on prompt_logprobs: ask for the whole vocabulary on a one-token prompt (whose only
        entry is null, so nothing is computed or sent back) and read the cap from the refusal."""
        resp = call(self.client, "POST", "/v1/completions", "vLLM", json=completion_body(self.model, [[0]], vocab_size))
        if resp.status_code == 200:
            return vocab_size  # --max-logprobs -1, or at least the vocabulary
        if resp.status_code == 400 and (found := _CAP.search(error_message(resp))):
            return int(found.group(1))
        raise VLLMError(f"vLLM /v1/completions answered {resp.status_code} to the prompt_logprobs probe: "
                        f"{error_message(resp)}")

    def prompt_logprobs(self, prompts: list[list[int]], k: int) -> list[list[Position]]:
        """`choices[i].prompt_logprobs` of each prompt, in order (choice i is prompt i: n = 1), as parsed:
        the entries are checked where they are read (vllm.split_entry)."""
        resp = call(self.client, "POST", "/v1/completions", "vLLM", json=completion_body(self.model, prompts, k))
        if resp.status_code != 200:
            raise VLLMError(f"vLLM /v1/completions answered {resp.status_code}: {error_message(resp)}")
        choices = json_body(resp).get("choices") or []
        if len(choices) != len(prompts) or [c.get("index") for c in choices] != list(range(len(prompts))):
            raise VLLMError(f"vLLM answered {len(choices)} choices out of order or for a batch of {len(prompts)}")
        out = [c.get("prompt_logprobs") for c in choices]
        if not all(isinstance(p, list) for p in out):
            raise VLLMError("vLLM answered without prompt_logprobs")
        return out

    def close(self) -> None:
        self.client.close()
