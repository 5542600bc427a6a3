"""`trb-teacher serve --model PATH --backend hf --host 127.0.0.1 --port 8000`.

With SGLang: `trb-teacher serve --backend sglang --sglang-url http://127.0.0.1:30000 --model PATH`.
With vLLM: `trb-teacher serve --backend vllm --vllm-url http://127.0.0.1:8001 --model PATH` (docs/vllm.md).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from pydantic import ValidationError

from shared.model_source import ModelSourceError, check_model_source
from teacher_server.auth import load_keys, load_secret
from teacher_server.settings import ServerSettings

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trb-teacher", description="Teacher logit server.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="Serve a teacher model over HTTP.")
    serve.add_argument("--model", required=True, help="Local path or hub id of a causal LM.")
    serve.add_argument("--backend", default="hf", choices=["hf", "sglang", "vllm"])
    serve.add_argument("--sglang-url", default=None, help="SGLang server for --backend sglang, e.g. "
                       "http://127.0.0.1:30000 (--model is still read for the tokenizer).")
    serve.add_argument("--sglang-engine", action="store_true", default=None,
                       help="Run sglang.Engine in this process instead of --sglang-url (GPU only).")
    serve.add_argument("--sglang-vocab-size", type=int, default=None)
    serve.add_argument("--sglang-api-key-file", default=None, help="File holding the --api-key of the SGLang "
                       "server; or set TRB_TEACHER_SGLANG_API_KEY.")
    serve.add_argument("--vllm-url", default=None, help="`vllm serve` for --backend vllm, e.g. "
                       "http://127.0.0.1:8001 (--model is still read for the tokenizer).")
    serve.add_argument("--vllm-dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"],
                       help="The --dtype vLLM was started with (no vLLM generate route reports it; a pooling runner's "
                       "is read off its hidden states).")
    serve.add_argument("--vllm-api-key-file", default=None, help="File holding the --api-key of the vLLM server; "
                       "or set TRB_TEACHER_VLLM_API_KEY.")
    serve.add_argument("--engine-wait", type=float, default=None, dest="engine_wait_s",
                       help="Seconds to wait for the SGLang/vLLM engine's /health at startup (default 600); the "
                       "teacher listens meanwhile and /ready answers 503 with the reason.")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--device", default="cpu")
    serve.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    serve.add_argument("--decoder", default=None, choices=["auto", "eager", "static", "qwen3"],
                       help="hf session decoder: auto = static KV cache + CUDA graph on a GPU, the hand-written "
                       "Qwen3 step on a CPU for Qwen3 models, eager elsewhere.")
    serve.add_argument("--served-name", default=None, help="Name reported in /v1/model.")
    serve.add_argument("--max-top-k", type=int, default=None)
    serve.add_argument("--max-context", type=int, default=None)
    serve.add_argument("--allow-full", action="store_true", default=None,
                       help="Allow full-vocabulary logprobs (under --max-full-values).")
    serve.add_argument("--max-full-values", type=int, default=None)
    serve.add_argument("--session-ttl", type=float, default=None, dest="session_ttl_s")
    serve.add_argument("--max-batch-tokens", type=int, default=None,
                       help="Tokens per backend call (default 128 for hf on a CPU, 1024 for hf on a GPU, "
                       "the per-request limit max_tokens for sglang and vllm, which batch on their own): "
                       "larger batches on a GPU, shorter waits on a CPU.")
    serve.add_argument("--threads", type=int, default=None, help="torch intra-op threads.")
    serve.add_argument("--model-thread", action="store_false", default=None, dest="model_process",
                       help="Run the model on a thread of the server process instead of a worker process "
                       "(debugging; slower under load).")
    serve.add_argument("--forward-deadline", type=float, default=None, dest="forward_deadline_s",
                       help="Watchdog (s, default 120; 0 = off): a model call longer than this (+ "
                       "--forward-deadline-per-token per token) gets the worker killed and restarted.")
    serve.add_argument("--forward-deadline-per-token", type=float, default=None, dest="forward_deadline_per_token_s")
    serve.add_argument("--shutdown-grace", type=float, default=None, dest="shutdown_grace_s",
                       help="Seconds in-flight work may finish after SIGTERM (default 30).")
    serve.add_argument("--quarantine", type=float, default=None, dest="quarantine_s",
                       help="Seconds a request that crashed the model twice is refused (default 600).")
    serve.add_argument("--api-keys-file", default=None, help="File of name:secret lines; or set TRB_TEACHER_API_KEYS.")
    serve.add_argument("--shared-key-file", default=None, help="Key file shared with the trainers (docker "
                       "compose): the key in it is accepted as client `trainer`, minted there (mode 0600) at the "
                       "first start and reused after; $TRB_API_KEY, when set, is used instead and the file left alone.")
    serve.add_argument("--compat-keyless-loopback", action="store_true", default=None,
                       help="With API keys set, still answer /v1/completions and /v1/models from loopback peers "
                       "that send no key (TRL's clients send none; docs/interop.md). Other peers and routes need a key.")
    serve.add_argument("--insecure-no-auth", action="store_true",
                       help="Allow a non-loopback --host without API keys (trusted networks only).")
    serve.add_argument("--log-level", default="info")
    return parser


def _describe(exc: Exception) -> str:
    """The problems without the input values, which may hold API keys."""
    if not isinstance(exc, ValidationError):
        return str(exc)
    return "\n".join(f"  {'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg'].removeprefix('Value error, ')}"
                     for e in exc.errors(include_input=False))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["export"]:
        sys.exit("trb-teacher export is now `trb-train export` (the same arguments): it is a client of the server")
    args = _parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items()
                 if v is not None and k not in ("command", "host", "port", "log_level", "insecure_no_auth")}
    try:
        cfg = ServerSettings(**overrides)
        keys = load_keys(cfg.api_keys, cfg.api_keys_file, cfg.shared_key_file, os.environ.get("TRB_API_KEY"))
        load_secret(None, cfg.sglang_api_key_file, "SGLang API key")  # fail now on an unreadable file
        load_secret(None, cfg.vllm_api_key_file, "vLLM API key")
    except (ValidationError, ValueError) as exc:
        sys.exit(f"trb-teacher: bad settings:\n{_describe(exc)}")
    try:
        check_model_source("--model", cfg.model)
    except ModelSourceError as exc:
        sys.exit(f"trb-teacher: {exc}")
    if not keys and args.host not in LOOPBACK and not args.insecure_no_auth:
        sys.exit(f"trb-teacher: refusing to listen on {args.host} without API keys; set TRB_TEACHER_API_KEYS, "
                 "--api-keys-file or --shared-key-file, or pass --insecure-no-auth on a trusted network")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import uvicorn

    from teacher_server.app import create_app

    # uvicorn drains in-flight requests on SIGTERM/SIGINT, runs the lifespan shutdown, then re-raises
    # the signal; these no-op handlers turn that re-raise into a clean exit status 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    app = create_app(cfg, exit_on_failure=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=max(1, round(cfg.shutdown_grace_s)))
    if app.state.startup_error:
        sys.exit(f"trb-teacher: the backend did not start: {app.state.startup_error}")


if __name__ == "__main__":
    main()
