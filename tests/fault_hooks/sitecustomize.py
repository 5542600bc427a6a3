"""Python runs this at start-up in a process whose PYTHONPATH holds this folder (fault_markers.enable).

With TRB_TEACHER_FAULT_HOOKS=1 it wraps the teacher worker's backend, once `teacher_server.worker` is
imported, so that a marked score or session request crashes or hangs the worker (fault_markers.py).
Any other process, and every process without the variable, is left exactly as it was.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from typing import Any

if os.environ.get("TRB_TEACHER_FAULT_HOOKS") == "1":
    from fault_markers import trip

    class _Tripping:
        """The worker's backend, tripping on marked requests before it runs them."""

        def __init__(self, backend: Any) -> None:
            self._backend = backend

        def __getattr__(self, name: str) -> Any:
            return getattr(self._backend, name)

        def score(self, requests: Any) -> Any:
            trip([seq for r in requests for seq in r.sequences])
            return self._backend.score(requests)

        def open_session(self, sequences: Any, top_k: int) -> Any:
            trip(sequences)
            return self._backend.open_session(sequences, top_k)

    def _wrap(worker: Any) -> None:
        serve = worker._serve

        def _serve(conn: Any, factory: Any) -> None:
            serve(conn, lambda: _Tripping(factory()))

        # spawn pickles the worker's target by name: this must be `teacher_server.worker._serve`
        _serve.__module__, _serve.__qualname__ = worker.__name__, "_serve"
        worker._serve = _serve

    class _WrapWorker(importlib.abc.MetaPathFinder):
        def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
            if name != "teacher_server.worker":
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is None or spec.loader is None:
                return spec
            run = spec.loader.exec_module

            def exec_module(module: Any) -> None:
                run(module)
                _wrap(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _WrapWorker())
