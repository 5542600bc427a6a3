"""The model in a process of its own, behind the same `Backend` interface.

Why: a small model's forward is mostly Python (one op dispatch after another), and so is the HTTP
work around it. In one process the two take turns on one interpreter lock, so under load every
request waits for the other side's Python as well as for its turn on the model, and fair queuing
cannot help a light client (docs/performance.md, "Load and fairness"). Here the server process
parses, queues and encodes; the worker only runs the backend. The scheduler is unchanged: its
model thread now spends a call blocked on a pipe, with the lock released.

Sessions live in the worker; the server holds a `RemoteSession` handle with the lengths and bytes
the worker reports after each call. Closing a handle is queued and sent with the next call, so it
never waits behind a forward in progress.

If the worker dies (killed, out of memory), the call in flight fails with `WorkerCrashed`, a new
worker loads the model, and the sessions the old one held are gone: their next extend answers
`session_not_found`, which clients already handle by rebuilding from their prefixes. Only a death
*while a call runs* can be that call's fault, so only then is it `WorkerCrashed` (which the
poison-request quarantine counts against the batch): a worker found dead before the call is sent
(killed while idle) is replaced first and the call runs on the new one, and a failed restart answers
plain `WorkerDied`. Otherwise an innocent request sent after an idle kill, or during a failed
restart, would take the blame, and two such strikes would quarantine it.

A watchdog bounds each call: with `deadline_s` set, a call that has not answered within
`deadline_s + deadline_per_token_s * tokens` gets the worker killed and restarted, and fails with
`WorkerHung` (503), so one hung forward cannot block every tenant, or shutdown, for good. (In
`--model-thread` mode there is no watchdog: a thread cannot be killed.) `close` waits up to
`grace_s` for the call in flight, then kills the worker, so no process outlives the server.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import pickle
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from shared.protocol import ScoreRequest, SequenceScores
from teacher_server.backends.base import Backend, SessionState, StepArrays

log = logging.getLogger("teacher_server.worker")
RESTART_PAUSE_S = 10.0  # after a failed restart, requests get 503 for this long before the next try


class WorkerDied(RuntimeError):
    """The model process is not there to answer (503): it died, or could not be restarted."""


class WorkerCrashed(WorkerDied):
    """The model process died while it ran this call (the call may be why); a new one has been started."""


class WorkerHung(WorkerCrashed):
    """A call outran the watchdog's deadline; the worker was killed and a new one started."""


class SessionLost(KeyError):
    """The worker holds no state for this session (it was restarted since the session opened)."""


class RemoteSession(SessionState):
    """The server-side handle of a session whose KV cache lives in the worker."""

    def __init__(self, owner: ProcessBackend, sid: int, generation: int, lengths: list[int], nbytes: int) -> None:
        self.owner, self.sid, self.generation = owner, sid, generation
        self.lengths = lengths
        self._nbytes = nbytes
        self.closed = False

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.owner.drop(self)

    def __del__(self) -> None:  # a handle lost without close (e.g. refused by the session cap) frees it too
        self.close()


class ProcessBackend(Backend):
    """Runs `factory()`'s backend in a spawned process; `factory` must be picklable."""

    def __init__(self, factory: Callable[[], Backend], deadline_s: float | None = None,
                 deadline_per_token_s: float = 0.0, grace_s: float = 30.0) -> None:
        self._factory = factory
        self.deadline_s, self.deadline_per_token_s, self.grace_s = deadline_s, deadline_per_token_s, grace_s
        self._closing = False
        self.hung = 0  # workers the watchdog killed
        self._ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA or threads
        self._lock = threading.Lock()  # one call on the pipe at a time
        self._drops: deque[int] = deque()  # closed sessions, freed with the next call
        self._ids = itertools.count()
        self.generation = 0
        self.restarts = 0
        self._conn: Connection | None = None
        self._retry_at, self._error = 0.0, ""
        self._start()

    def _start(self) -> None:
        conn, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_serve, args=(child, self._factory), name="teacher-model")
        proc.start()
        child.close()  # so that the worker's death reads as EOF here
        try:
            kind, payload = conn.recv()
        except EOFError:
            conn.close()
            proc.join(timeout=5)
            raise RuntimeError(f"the model process exited with code {proc.exitcode} while loading") from None
        if kind == "error":
            conn.close()
            proc.join(timeout=5)
            raise payload
        self.info = payload
        self._conn, self._proc = conn, proc
        self._drops.clear()
        self.generation += 1

    def _call(self, op: str, *args: Any, tokens: int = 0) -> Any:
        with self._lock:
            if self._closing:
                raise WorkerDied("the server is shutting down")
            if self._conn is not None and not self._proc.is_alive():  # died while idle: not this call's fault
                code = self._reap()
                log.error("the model process died (exit code %s) while idle; starting a new one", code)
                self._replace()
            if self._conn is None:  # the last restart failed: try again (after a pause), or answer 503
                self._restart()
            drops = [self._drops.popleft() for _ in range(len(self._drops))]
            try:
                self._conn.send((op, args, drops))
            except OSError as exc:  # it died between the check and the send: the call never reached it
                code = self._reap()
                self._replace()
                raise WorkerDied(f"the model process died (exit code {code}) before it got the request; a new "
                                 "one is serving, open sessions were lost") from exc
            try:
                kind, payload = self._answer(op, tokens)
            except (EOFError, OSError) as exc:
                code = self._reap()
                log.error("the model process died (exit code %s) during %s; starting a new one", code, op)
                self._replace()
                raise WorkerCrashed(f"the model process died (exit code {code}); a new one is serving, "
                                    "open sessions were lost") from exc
        if kind == "error":
            raise payload
        return payload

    def _answer(self, op: str, tokens: int) -> tuple[str, Any]:
        """The worker's reply, or kill it and raise `WorkerHung` once the deadline has passed."""
        if self.deadline_s is not None:
            limit = self.deadline_s + self.deadline_per_token_s * tokens
            if not self._conn.poll(limit):
                self._proc.kill()
                self._reap()
                self.hung += 1
                log.error("the model process ran %s of %d tokens for over %.1f s; killed it, starting a new one",
                          op, tokens, limit)
                self._replace()
                raise WorkerHung(f"the model ran {op} for over {limit:.1f} s (the deadline for {tokens} tokens) "
                                 "and was restarted; open sessions were lost")
        return self._conn.recv()

    def _replace(self) -> None:
        """Start the next worker after one died, unless the server is shutting down."""
        self.restarts += 1
        if self._closing:
            raise WorkerDied("the model process stopped while the server shuts down")
        self._restart()

    def _reap(self) -> int | None:
        """Close the pipe and make sure the old process is gone (killed if it lingers); its exit code."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._proc.join(timeout=5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        return self._proc.exitcode

    def _restart(self) -> None:
        """Start a new worker, or raise `WorkerDied` (503) if that fails or failed moments ago."""
        if time.monotonic() < self._retry_at:
            raise WorkerDied(f"the model process is down ({self._error}); the server retries its start")
        try:
            self._start()
        except Exception as exc:
            self._error = f"{type(exc).__name__}: {exc}"
            self._retry_at = time.monotonic() + RESTART_PAUSE_S
            log.error("the model process could not be restarted: %s", self._error)
            raise WorkerDied(f"the model process died and could not be restarted: {self._error}") from exc

    @property
    def ready(self) -> bool:
        return self._conn is not None

    def drop(self, session: RemoteSession) -> None:
        if session.generation == self.generation:
            self._drops.append(session.sid)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._conn is not None else None

    def score(self, requests: list[ScoreRequest]) -> list[list[SequenceScores]]:
        return self._call("score", requests, tokens=sum(len(s) for r in requests for s in r.sequences))

    def open_session(self, sequences: list[list[int]], top_k: int) -> tuple[RemoteSession, StepArrays]:
        sid = next(self._ids)
        lengths, nbytes, step = self._call("open", sid, sequences, top_k, tokens=sum(map(len, sequences)))
        return RemoteSession(self, sid, self.generation, lengths, nbytes), step

    def extend_session(self, state: RemoteSession, rows: list[int],  # type: ignore[override]
                       tokens: list[list[int]], top_k: int, all_positions: bool = False) -> StepArrays:
        if state.generation != self.generation:
            raise SessionLost(state.sid)
        state.lengths, state._nbytes, step = self._call("extend", state.sid, rows, tokens, top_k, all_positions,
                                                        tokens=sum(map(len, tokens)))
        return step

    def close(self) -> None:
        """Let the call in flight finish for up to `grace_s`, then stop the worker (killed if it must be)."""
        self._closing = True
        if not self._lock.acquire(timeout=self.grace_s):
            log.warning("the model call in flight outlasted the %.0f s grace period; killing the worker", self.grace_s)
            self._proc.kill()  # the call sees EOF and, as we are closing, starts no new worker
            self._lock.acquire()
        try:
            if self._conn is not None:
                self._conn.close()  # the worker reads EOF and exits
                self._conn = None
                self._proc.join(timeout=self.grace_s)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()
        finally:
            self._lock.release()


def _serve(conn: Connection, factory: Callable[[], Backend]) -> None:
    """The worker's loop: load, then answer (op, args, drops) messages until the pipe closes."""
    # Signals are the server's business: it drains its requests, then closes the pipe to stop us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        backend = factory()
    except BaseException as exc:  # noqa: BLE001 - reported to the server, which fails its startup
        conn.send(("error", _portable(exc)))
        return
    conn.send(("ok", backend.info))
    sessions: dict[int, SessionState] = {}
    while True:
        try:
            op, args, drops = conn.recv()
        except EOFError:
            break
        for sid in drops:
            sessions.pop(sid, None)
        try:
            if op == "score":
                result: Any = backend.score(*args)
            elif op == "open":
                sid, sequences, top_k = args
                state, step = backend.open_session(sequences, top_k)
                sessions[sid] = state
                result = (list(state.lengths), state.nbytes, step)
            elif op == "extend":
                sid, rows, tokens, top_k, all_positions = args
                if (state := sessions.get(sid)) is None:
                    raise SessionLost(sid)
                step = backend.extend_session(state, rows, tokens, top_k, all_positions)
                result = (list(state.lengths), state.nbytes, step)
            else:
                raise ValueError(f"unknown worker op {op!r}")
            conn.send(("ok", result))
        except Exception as exc:  # noqa: BLE001 - delivered to the request that caused it
            log.exception("model worker: %s failed", op)
            conn.send(("error", _portable(exc)))
    backend.close()


def _portable(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling, else a RuntimeError carrying its text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(exc).__name__}: {exc}")
