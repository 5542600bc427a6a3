"""Poison-request quarantine: fingerprints, strikes, and the scheduler running suspects alone."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from starlette.requests import Request

from shared.protocol import ScoreRequest
from teacher_server import quarantine as q
from teacher_server.backends.hf import HFBackend
from teacher_server.deps import client_of
from teacher_server.quarantine import Quarantine, Quarantined, fingerprint
from teacher_server.scheduler import FairScheduler
from teacher_server.worker import WorkerCrashed, WorkerDied

POISON = 11  # a request whose first token is this "kills the worker" in the fake below


class PoisonBackend(HFBackend):
    """The real backend, except that a batch holding a poison request dies as a crashed worker would."""

    batches: list[int]
    down: int  # the next this many batches find the worker down (a failed restart): not their fault

    def score(self, requests):  # type: ignore[no-untyped-def]
        self.batches.append(len(requests))
        if any(r.sequences[0][0] == POISON for r in requests):
            raise WorkerCrashed("the model process died (exit code -9)")
        if self.down:
            self.down -= 1
            raise WorkerDied("the model process is down; the server retries its start")
        return super().score(requests)


@pytest.fixture()
def backend(tiny_model: Path) -> PoisonBackend:
    b = PoisonBackend(str(tiny_model))
    b.batches, b.down = [], 0
    return b


def test_fingerprint_names_the_same_request_alike_and_others_apart() -> None:
    a = fingerprint("score", [[1, 2, 3], [4]], "top_k=5")
    assert a == fingerprint("score", [[1, 2, 3], [4]], "top_k=5")
    assert a.startswith("score:2x3:")
    others = [fingerprint("score", [[1, 2, 4], [4]], "top_k=5"), fingerprint("score", [[1, 2], [3, 4]], "top_k=5"),
              fingerprint("score", [[1, 2, 3], [4]], "top_k=6"), fingerprint("open", [[1, 2, 3], [4]], "top_k=5")]
    assert len({a, *others}) == 5


def test_two_strikes_quarantine_and_both_expire(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(q.time, "monotonic", lambda: now[0])
    quarantine = Quarantine(hold_s=60)
    assert quarantine.strike(["a", "b", ""]) == set()
    assert quarantine.suspect("a") and not quarantine.blocked("a") and not quarantine.suspect("")
    assert quarantine.strike(["a"]) == {"a"} and quarantine.blocked("a") and quarantine.total == 1
    now[0] += 61
    assert not quarantine.blocked("a") and not quarantine.suspect("b")  # both forgotten after hold_s


async def test_a_request_in_two_crashes_is_refused_and_never_run_again(backend: PoisonBackend) -> None:
    scheduler = FairScheduler(backend, max_queue=100, max_batch_tokens=64)
    scheduler.start()
    poison, innocent = ScoreRequest(sequences=[[POISON, 2, 3]]), ScoreRequest(sequences=[[1, 2, 3]])
    # first crash: both were in the batch, both get the worker's 503
    first = await asyncio.gather(scheduler.score("bad", poison), scheduler.score("good", innocent),
                                 return_exceptions=True)
    assert backend.batches == [2] and all(isinstance(r, WorkerDied) for r in first)
    # the retries: each suspect runs alone, so the bystander is served and the poison alone is blamed
    second = await asyncio.gather(scheduler.score("bad", poison), scheduler.score("good", innocent),
                                  return_exceptions=True)
    assert backend.batches == [2, 1, 1]
    assert isinstance(second[0], Quarantined) and isinstance(second[1], list)
    with pytest.raises(Quarantined, match="crashed the model twice"):
        await scheduler.score("bad", poison)
    assert backend.batches == [2, 1, 1]  # refused before it reached the model
    assert scheduler.quarantine.total == 1
    await scheduler.stop()


def _request(host: str, client_id: str) -> Request:
    return Request({"type": "http", "method": "POST", "path": "/", "client": (host, 40000),
                    "headers": [(b"x-client-id", client_id.encode())]})


def test_standing_follows_the_peer_address_unless_it_is_loopback() -> None:
    assert client_of(_request("127.0.0.1", "exp-a")) == "exp-a"
    assert client_of(_request("::1", "exp-b")) == "exp-b"
    # a remote caller that rotates its id keeps one standing
    assert client_of(_request("10.1.2.3", "id-1")) == client_of(_request("10.1.2.3", "id-2")) == "peer:10.1.2.3"
    assert client_of(_request("10.1.2.4", "id-1")) != client_of(_request("10.1.2.3", "id-1"))
    keyed = _request("10.1.2.3", "id-1")
    keyed.state.key_name = "team-a"
    assert client_of(keyed) == "team-a"


async def test_a_worker_that_was_down_strikes_no_one(backend: PoisonBackend) -> None:
    """A 503 because the worker was dead before the batch was sent, or would not restart, is not the
    batch's fault: twice in a row must not quarantine an innocent request (or even make it a suspect)."""
    scheduler = FairScheduler(backend, max_queue=100, max_batch_tokens=64)
    scheduler.start()
    innocent = ScoreRequest(sequences=[[1, 2, 3]])
    backend.down = 2
    for _ in range(2):
        with pytest.raises(WorkerDied):
            await scheduler.score("good", innocent)
    assert isinstance(await scheduler.score("good", innocent), list)
    assert scheduler.quarantine.total == 0 and not scheduler.quarantine.suspect(
        fingerprint("score", innocent.sequences, innocent.model_dump_json(exclude={"sequences"})))
