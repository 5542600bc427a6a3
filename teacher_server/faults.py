"""Test-only fault hooks: make the model worker crash or hang on a marked request.

Why: the quarantine and the watchdog guard against requests that kill or hang the model (a kernel
fault, host memory running out, a CUDA error). Those cannot be caused on demand with a tiny model
on a CPU, so tests and `bench/soak.py` mark a request instead. The hooks are off unless
`TRB_TEACHER_FAULT_HOOKS=1` is in the worker's environment; a served model never sees them.

A request is marked when one of its sequences starts with `CRASH` (the worker kills itself with
SIGKILL, as the kernel's out-of-memory killer would) or `HANG` (the worker sleeps for good).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Sequence

ENV = "TRB_TEACHER_FAULT_HOOKS"
CRASH = (5, 7, 5, 7, 5, 7, 5, 7)
HANG = (6, 8, 6, 8, 6, 8, 6, 8)


def enabled() -> bool:
    return os.environ.get(ENV) == "1"


def _marked(sequences: Sequence[Sequence[int]], marker: tuple[int, ...]) -> bool:
    return any(tuple(s[: len(marker)]) == marker for s in sequences)


def trip(sequences: Sequence[Sequence[int]]) -> None:
    """Crash or hang this process if a sequence carries a marker (call only when `enabled()`)."""
    if _marked(sequences, CRASH):
        os.kill(os.getpid(), signal.SIGKILL)
    if _marked(sequences, HANG):
        while True:
            time.sleep(3600)
