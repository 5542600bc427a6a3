"""Requests that crashed the model twice are refused for a while: poison-request quarantine.

Why: a request that kills the model worker (host memory running out, a kernel fault, a CUDA error)
is retried by its client, as a 503 asks, and would kill the new worker too. Each crash costs every
tenant its sessions and a model reload. So the scheduler fingerprints each job (kind, shape and a
hash of the content) and, when the worker dies while running a batch or the watchdog kills it,
gives every job of that batch a strike (a worker found dead before the batch was sent, or one that
will not restart, strikes no one: worker.WorkerCrashed vs WorkerDied). A job with a strike (a suspect) runs in a batch of its own from then on, so that
its next crash cannot be blamed on a neighbour; a second strike quarantines it: it is refused with
422 `quarantined` for `hold_s` seconds and never reaches the worker. Strikes are forgotten after
`hold_s` as well, so a bystander of one crash is only ever run alone for a while.

Session extends carry no fingerprint: a crash loses the session, so the same extend cannot come
back; the client reopens the session from its prefixes, and that open is fingerprinted.
"""

from __future__ import annotations

import hashlib
import time
from array import array
from collections.abc import Iterable, Sequence

MAX_ENTRIES = 10_000  # bounds the memory of strikes: the oldest are forgotten first


class Quarantined(RuntimeError):
    """This request crashed the model twice; it is refused without being run (422, not retried)."""


def fingerprint(kind: str, sequences: Sequence[Sequence[int]], params: str = "") -> str:
    """Kind, shape and a hash of the tokens and other parameters: equal for a retried request."""
    digest = hashlib.blake2b(f"{kind}|{params}".encode(), digest_size=12)
    for seq in sequences:
        digest.update(len(seq).to_bytes(4, "little"))
        digest.update(array("q", seq).tobytes())
    shape = f"{len(sequences)}x{max(map(len, sequences), default=0)}"
    return f"{kind}:{shape}:{digest.hexdigest()}"


class Quarantine:
    def __init__(self, hold_s: float = 600.0, strikes: int = 2) -> None:
        self.hold_s, self.strikes = hold_s, strikes
        self._strikes: dict[str, tuple[int, float]] = {}  # fingerprint -> (crashes seen, when the last was)
        self.total = 0  # requests quarantined so far (the metric)

    def _count(self, fp: str, now: float) -> int:
        count, when = self._strikes.get(fp, (0, 0.0))
        if count and now - when > self.hold_s:
            del self._strikes[fp]
            return 0
        return count

    def suspect(self, fp: str) -> bool:
        """In a crash lately: run it alone."""
        return bool(fp) and self._count(fp, time.monotonic()) > 0

    def blocked(self, fp: str) -> bool:
        return bool(fp) and self._count(fp, time.monotonic()) >= self.strikes

    def strike(self, fps: Iterable[str]) -> set[str]:
        """Record a crash of the batch holding `fps`; the fingerprints this crash quarantines."""
        now, newly = time.monotonic(), set()
        for fp in set(filter(None, fps)):
            count = self._count(fp, now) + 1
            self._strikes.pop(fp, None)  # re-inserted last: the dict stays in order of last crash
            self._strikes[fp] = (count, now)
            if count == self.strikes:
                newly.add(fp)
                self.total += 1
        while len(self._strikes) > MAX_ENTRIES:
            del self._strikes[next(iter(self._strikes))]
        return newly
