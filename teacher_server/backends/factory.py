"""Build the configured backend. Kept free of the web stack: the model worker process imports it."""

from __future__ import annotations

from teacher_server.backends.base import Backend
from teacher_server.settings import ServerSettings


def load_backend(cfg: ServerSettings) -> Backend:
    """The backend itself, in this process (`build_backend` in `app.py` decides which process)."""
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    if cfg.backend == "hf":
        from teacher_server.backends.hf import HFBackend

        return HFBackend(cfg.model, device=cfg.device, dtype=cfg.dtype, name=cfg.served_name,
                         max_context=cfg.max_context, decoder=cfg.decoder)
    if cfg.backend == "sglang":
        from teacher_server.auth import load_secret
        from teacher_server.backends.sglang import SGLangBackend

        key = cfg.sglang_api_key.get_secret_value() if cfg.sglang_api_key else None
        return SGLangBackend(cfg.model, url=cfg.sglang_url, engine=cfg.sglang_engine, name=cfg.served_name,
                             max_context=cfg.max_context, vocab_size=cfg.sglang_vocab_size, dtype=cfg.dtype,
                             api_key=load_secret(key, cfg.sglang_api_key_file, "SGLang API key"),
                             wait_s=cfg.engine_wait_s)
    if cfg.backend == "vllm":
        from teacher_server.auth import load_secret
        from teacher_server.backends.vllm import VLLMBackend

        key = cfg.vllm_api_key.get_secret_value() if cfg.vllm_api_key else None
        return VLLMBackend(cfg.model, url=cfg.vllm_url or "", name=cfg.served_name, max_context=cfg.max_context,
                           api_key=load_secret(key, cfg.vllm_api_key_file, "vLLM API key"), wait_s=cfg.engine_wait_s,
                           dtype=cfg.vllm_dtype)
    raise ValueError(f"unknown backend {cfg.backend!r}")
