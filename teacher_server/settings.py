"""Server settings, from CLI flags or TRB_TEACHER_* environment variables."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TRB_TEACHER_", extra="forbid")

    model: str = Field(description="Local path or hub id of the teacher (a causal LM).")
    backend: Literal["hf", "sglang", "vllm"] = "hf"
    sglang_url: str | None = Field(None, description="URL of a running SGLang server (backend sglang).")
    sglang_engine: bool = Field(False, description="Run sglang.Engine in-process instead (backend sglang).")
    sglang_vocab_size: int | None = Field(None, description="Vocab size when the model config lacks it.")
    sglang_api_key: SecretStr | None = Field(None, description="The --api-key of the SGLang server, sent as a "
                                             "Bearer token (prefer sglang_api_key_file).")
    sglang_api_key_file: str | None = Field(None, description="A file holding that key (surrounding whitespace "
                                            "is dropped).")
    vllm_url: str | None = Field(None, description="URL of a running `vllm serve` (backend vllm).")
    vllm_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="The --dtype vLLM was started with. auto: read off a pooling runner's hidden states, "
        "or /server_info (VLLM_SERVER_DEV_MODE=1); else assumed as vLLM's --dtype auto picks (float32 -> bfloat16), "
        "with a warning: no other vLLM route reports it.")
    vllm_api_key: SecretStr | None = Field(None, description="The --api-key of the vLLM server, sent as a Bearer "
                                           "token (prefer vllm_api_key_file).")
    vllm_api_key_file: str | None = Field(None, description="A file holding that key (surrounding whitespace is "
                                          "dropped).")
    engine_wait_s: float = Field(600.0, gt=0, description="How long the sglang and vllm backends wait at startup for "
                                 "their engine's /health (the teacher listens meanwhile: /ready answers 503).")
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    decoder: Literal["auto", "eager", "static", "qwen3"] = Field(
        "auto", description="Session decoder (hf backend): auto is the static cache with a captured step on "
        "CUDA, the hand-written Qwen3 step on a CPU for Qwen3 models, eager (transformers) elsewhere.")
    served_name: str | None = None
    max_top_k: int = 100
    max_context: int | None = None
    max_sequences: int = 256
    max_tokens: int = 65536
    allow_full: bool = False
    max_full_values: int = 16_000_000
    max_queue: int = 256
    max_batch_tokens: int | None = Field(None, ge=1, description="Tokens per backend call: requests are batched "
                                         "up to it and larger ones split by sequences, so no client holds the "
                                         "model for longer. Default: 128 for the hf backend on a CPU, 1024 on a "
                                         "GPU; for the sglang and vllm backends max_tokens, so a request is never "
                                         "split (the engine schedules its own prefills).")
    session_ttl_s: float = 600.0
    max_sessions: int = 256
    max_session_bytes: int = 2 << 30
    threads: int | None = None
    model_process: bool = Field(True, description="Run the model in a worker process, so that its Python does "
                                "not share the interpreter lock with the HTTP work (off: a thread, for debugging).")
    forward_deadline_s: float = Field(120.0, ge=0, description="Watchdog: a model call that runs longer than "
                                      "this plus forward_deadline_per_token_s per token gets the worker killed "
                                      "and restarted (its requests answer 503). 0 turns it off.")
    forward_deadline_per_token_s: float = Field(0.01, ge=0)
    shutdown_grace_s: float = Field(30.0, ge=0, description="On SIGTERM, how long requests in flight may finish "
                                    "before they are cut off and the model worker is killed.")
    quarantine_s: float = Field(600.0, gt=0, description="How long a request that crashed the model twice is "
                                "refused (422 quarantined).")
    max_body_bytes: int = 64 << 20
    api_keys: str | None = Field(None, description="name:secret,... (prefer api_keys_file).")
    api_keys_file: str | None = None
    compat_keyless_loopback: bool = Field(False, description="The vLLM-compatible routes (/v1/completions, "
                                          "/v1/models) answer loopback peers that send no key, though keys are set "
                                          "(for clients that send none, like TRL's AsyncDistillationTrainer); other "
                                          "peers and every other route still need a key (docs/interop.md).")
    shared_key_file: str | None = Field(None, description="The trainers' key, shared through a file (docker "
                                        "compose): accepted as client `trainer`; minted there (mode 0600) at the "
                                        "first start and reused after. $TRB_API_KEY, when set, is used instead.")

    @property
    def batch_tokens(self) -> int:
        """The token budget per backend call (`--max-batch-tokens` when given).

        hf: 128 on a CPU, 1024 on a GPU. Why smaller on a CPU: there a forward costs in proportion to its
        tokens, so a bigger batch buys no throughput and only makes the next client wait longer.

        sglang, vllm: `max_tokens`, the largest request accepted, so a request goes out whole. The engine
        takes any number of sequences in one call (each within its context length, which /v1/score checks
        first) and batches and chunks its prefills itself; the backend bounds each call's answer
        (ENTRY_BUDGET). A request cut here instead runs as engine calls one after another, each waiting
        for the last one's answer to be parsed: at the old default, 1024, bench/bench_engine_proxy.py's
        1,067 tokens took two calls, 0.2-0.36x of SGLang's own /generate time more than one call
        (docs/engines.md). The price: a light client may wait for a heavy client's whole request; a
        budget bounds that wait (`--max-batch-tokens`).
        """
        if self.max_batch_tokens:
            return self.max_batch_tokens
        if self.backend != "hf":
            return self.max_tokens
        return 128 if self.device == "cpu" else 1024

    @model_validator(mode="after")
    def _sglang_target(self) -> ServerSettings:
        if self.backend == "sglang" and bool(self.sglang_url) == self.sglang_engine:
            raise ValueError("backend sglang needs exactly one of sglang_url or sglang_engine")
        if (self.sglang_api_key or self.sglang_api_key_file) and not self.sglang_url:
            raise ValueError("sglang_api_key: only a server at sglang_url takes an API key")
        return self

    @model_validator(mode="after")
    def _vllm_target(self) -> ServerSettings:
        if self.backend == "vllm" and not self.vllm_url:
            raise ValueError("backend vllm needs vllm_url (the running `vllm serve`, e.g. http://127.0.0.1:8001)")
        if (self.vllm_api_key or self.vllm_api_key_file) and self.backend != "vllm":
            raise ValueError("vllm_api_key: only backend vllm takes a vLLM API key")
        return self
