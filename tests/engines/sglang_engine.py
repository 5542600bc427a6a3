"""Start and stop real SGLang 0.5.23 on the CPU for tests, from its own venv.

Standard library only: this runs in the repo's venv, SGLang in the venv scripts/engines/sglang.sh builds
(`venv_python()` is None until that script has finished). The server runs the checkpoint in float32 on
the CPU (`--device cpu`, `SGLANG_USE_CPU_ENGINE=1`; without AMX SGLang falls back to its torch-native
attention backend), with `--enable-return-hidden-states` so `/generate` can return the final norm's output
(the lm_head input) of every prompt position, and the `sgl_kernel` import stand-in
(tests/engines/sgl_kernel_standin) on its PYTHONPATH.

Flags, and why:
- `--dtype float32`: SGLang's `auto` runs a float32 checkpoint in float16.
- `--disable-overlap-schedule`: the overlapped scheduler is for GPUs.
- `--max-total-tokens 32768`: without a cap the CPU KV pool takes about 10 GB.
- `--chunked-prefill-size -1`: chunked prefill silently drops the hidden-state rows of middle chunks.
- `--mem-fraction-static 0.3`: needed here with chunked prefill off.
- `--sleep-on-idle`: otherwise an idle scheduler polls at 100% of a core, which on 2 cores takes that
  core from the teacher, the trainer and SGLang's own tokenizer and detokenizer.
With these, `/server_info` reports `max_req_input_len` 250 for the shipped models (context 256).

`launch` only starts the process (in a new session, so `stop` reaches SGLang's scheduler and detokenizer
children too); poll `/health`: connection refused, then 503 (about 2-3 s), then 200, 50-85 s after the
start on 2 busy cores. With `api_key`, every route but `/health` needs `Authorization: Bearer KEY`
(otherwise `401 {"error":"Unauthorized"}`). The three processes peak at about 3.6 GB RSS together
(2.6 GB PSS).
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import time
from collections.abc import Sequence

VERSION = "0.5.23"
STAMP = ".trb-engine-stamp"  # written by scripts/engines/sglang.sh once the venv works
STANDIN = pathlib.Path(__file__).resolve().parent / "sgl_kernel_standin"
MAX_TOTAL_TOKENS = 32768
MEM_FRACTION_STATIC = 0.3


def engines_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("TRB_ENGINES_DIR") or pathlib.Path.home() / ".cache/trb-distill/engines")


def venv_python() -> pathlib.Path | None:
    """The engine venv's python if scripts/engines/sglang.sh has finished building it, else None."""
    venv = engines_dir() / f"sglang-{VERSION}"
    python = venv / "bin" / "python"
    return python if (venv / STAMP).is_file() and python.exists() else None


def command(model: str, port: int, *, api_key: str | None = None, extra_args: Sequence[str] = (),
            hidden_states: bool = True) -> list[str]:
    """The server's command line (without the environment `launch` adds); `hidden_states` False launches
    it without the flags of the exact path, so a teacher in front of it takes the top-k path."""
    python = venv_python()
    if python is None:
        raise RuntimeError(f"no SGLang venv under {engines_dir()}: run scripts/engines/sglang.sh first")
    cmd = [str(python), "-m", "sglang.launch_server", "--model-path", model,
           "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", "float32",
           "--disable-overlap-schedule", "--max-total-tokens", str(MAX_TOTAL_TOKENS),
           "--mem-fraction-static", str(MEM_FRACTION_STATIC), "--sleep-on-idle"]
    if hidden_states:
        cmd += ["--enable-return-hidden-states", "--chunked-prefill-size", "-1"]
    if api_key is not None:
        cmd += ["--api-key", api_key]
    return cmd + list(extra_args)


def environment(threads: int = 1) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SGLANG_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(
        SGLANG_USE_CPU_ENGINE="1",
        PYTHONPATH=str(STANDIN),  # the sgl_kernel stand-in, and nothing of the repo's venv
        PYTHONSAFEPATH="1",  # `-m` would put the working directory (the repo, with its own packages) first
        PYTHONNOUSERSITE="1",
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS=str(threads),  # tests share 2 cores with the teacher and the trainer
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", DO_NOT_TRACK="1",
    )
    return env


def launch(model: str, port: int, *, api_key: str | None = None, log_path: pathlib.Path,
           threads: int = 1, extra_args: Sequence[str] = (), hidden_states: bool = True) -> subprocess.Popen:
    """Start SGLang on 127.0.0.1:port, stdout and stderr to log_path, in a new session; does not wait."""
    cmd = command(model, port, api_key=api_key, extra_args=extra_args, hidden_states=hidden_states)
    log_path = pathlib.Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    shown = ["<key>" if i and cmd[i - 1] == "--api-key" else a for i, a in enumerate(cmd)]
    with open(log_path, "ab") as log:
        log.write(("$ " + " ".join(shown) + "\n").encode())
        log.flush()
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=environment(threads), start_new_session=True)


def session_pids(sid: int, *, zombies: bool = False) -> list[int]:
    """Processes whose session id is sid (Linux /proc); zombies only if asked."""
    pids = []
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp session ...
        if int(fields[3]) == sid and (zombies or fields[0] != "Z"):
            pids.append(int(entry.name))
    return pids


def stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM SGLang's process group, SIGKILL after `timeout` s; raises if a process of its session survives.

    Also cleans up after a server whose main process was already killed (its scheduler and detokenizer
    children normally exit within a second by themselves). Returns once the session's zombies are
    reaped too (by init, for children of the killed main process; at most 5 s more).
    """
    sid = proc.pid  # start_new_session: the server leads its own session and process group

    def reaped() -> None:
        deadline = time.monotonic() + 5
        while session_pids(sid, zombies=True) and time.monotonic() < deadline:
            time.sleep(0.1)

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
            reaped()
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
        raise RuntimeError(f"SGLang (pid {sid}) left processes after SIGKILL: {left or [sid]}")
    reaped()
