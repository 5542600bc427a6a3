"""Incremental-decoding sessions: a TTL and memory caps over backend-owned state (KV caches).

When a cap is hit the least recently used sessions are evicted; clients keep their prefixes and
rebuild an evicted session on `session_not_found`, so eviction costs a prefill, never correctness.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from teacher_server.backends.base import SessionState


class SessionNotFound(KeyError):
    pass


@dataclass
class Session:
    id: str
    state: SessionState
    top_k: int
    client: str
    last_used: float
    logprob_dtype: str = "float32"


class SessionStore:
    def __init__(self, ttl_s: float, max_sessions: int, max_bytes: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s, self.max_sessions, self.max_bytes = ttl_s, max_sessions, max_bytes
        self._clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def nbytes(self) -> int:
        return sum(s.state.nbytes for s in self._sessions.values())

    def add(self, state: SessionState, top_k: int, client: str, logprob_dtype: str = "float32") -> Session:
        session = Session(secrets.token_hex(12), state, top_k, client, self._clock(), logprob_dtype)
        self._sessions[session.id] = session
        self.enforce_caps(keep=session.id)
        return session

    def get(self, session_id: str) -> Session:
        self.sweep()
        session = self._sessions.get(session_id)
        if session is None:
            raise SessionNotFound(session_id)
        session.last_used = self._clock()
        self._sessions.move_to_end(session_id)
        return session

    def remove(self, session_id: str) -> None:
        session = self._sessions.pop(session_id, None)
        if session is None:
            raise SessionNotFound(session_id)
        session.state.close()

    def discard(self, session_id: str) -> None:
        """Remove the session if it is still there."""
        if session_id in self._sessions:
            self.remove(session_id)

    def sweep(self) -> int:
        """Drop sessions idle for longer than the TTL."""
        now, expired = self._clock(), []
        for sid, s in self._sessions.items():
            if now - s.last_used > self.ttl_s:
                expired.append(sid)
        for sid in expired:
            self._sessions.pop(sid).state.close()
        return len(expired)

    def enforce_caps(self, keep: str | None = None) -> None:
        """Evict least recently used sessions (never `keep`) until both caps hold."""
        for sid in list(self._sessions):
            if len(self._sessions) <= self.max_sessions and self.nbytes <= self.max_bytes:
                return
            if sid != keep:
                self._sessions.pop(sid).state.close()
