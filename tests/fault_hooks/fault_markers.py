"""Test-only faults: make the teacher's model worker crash or hang on a marked request.

Why: the quarantine and the watchdog guard against requests that kill or hang the model (a kernel
fault, host memory running out, a CUDA error). Those cannot be caused on demand with a tiny model
on a CPU, so tests and `bench/soak.py` mark a request instead. Nothing of this ships in the server:
`sitecustomize.py` beside this file wraps the worker's backend in processes that have this folder on
PYTHONPATH and `TRB_TEACHER_FAULT_HOOKS=1` in their environment (`enable` sets both).

A request is marked when one of its sequences starts with `CRASH` (the worker kills itself with
SIGKILL, as the kernel's out-of-memory killer would) or `HANG` (the worker sleeps for good).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import MutableMapping, Sequence
from pathlib import Path

ENV = "TRB_TEACHER_FAULT_HOOKS"
HERE = str(Path(__file__).resolve().parent)
CRASH = (5, 7, 5, 7, 5, 7, 5, 7)
HANG = (6, 8, 6, 8, 6, 8, 6, 8)


def enable(environ: MutableMapping[str, str]) -> None:
    """Turn the hooks on for the processes started with `environ` from now on (servers, their workers)."""
    environ[ENV] = "1"
    environ["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, environ.get("PYTHONPATH")) if p)


def _marked(sequences: Sequence[Sequence[int]], marker: tuple[int, ...]) -> bool:
    return any(tuple(s[: len(marker)]) == marker for s in sequences)


def trip(sequences: Sequence[Sequence[int]]) -> None:
    """Crash or hang this process if a sequence carries a marker."""
    if _marked(sequences, CRASH):
        os.kill(os.getpid(), signal.SIGKILL)
    if _marked(sequences, HANG):
        while True:
            time.sleep(3600)
