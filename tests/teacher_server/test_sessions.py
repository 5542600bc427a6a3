"""Session TTL and caps, with a fake clock."""

from __future__ import annotations

import pytest

from teacher_server.backends.base import SessionState
from teacher_server.sessions import SessionNotFound, SessionStore


class Blob(SessionState):
    def __init__(self, size: int) -> None:
        self.size, self.lengths = size, [1]

    @property
    def nbytes(self) -> int:
        return self.size


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_ttl_expires_idle_sessions_only() -> None:
    clock = Clock()
    store = SessionStore(ttl_s=10, max_sessions=10, max_bytes=1000, clock=clock)
    a, b = store.add(Blob(1), 5, "x"), store.add(Blob(1), 5, "x")
    clock.now = 8
    store.get(a.id)
    clock.now = 15
    assert store.get(a.id) is a
    with pytest.raises(SessionNotFound):
        store.get(b.id)


def test_caps_evict_least_recently_used() -> None:
    store = SessionStore(ttl_s=100, max_sessions=2, max_bytes=100, clock=Clock())
    a, b = store.add(Blob(10), 5, "x"), store.add(Blob(10), 5, "x")
    store.get(a.id)  # b is now the least recently used
    c = store.add(Blob(10), 5, "x")
    assert b.id not in store._sessions and {a.id, c.id} == set(store._sessions)
    d = store.add(Blob(95), 5, "x")  # over the byte cap: everything else goes
    assert list(store._sessions) == [d.id] and store.nbytes == 95


def test_remove_unknown_raises() -> None:
    store = SessionStore(ttl_s=1, max_sessions=1, max_bytes=1)
    with pytest.raises(SessionNotFound):
        store.remove("nope")
