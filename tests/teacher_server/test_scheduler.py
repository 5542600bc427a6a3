"""Fair round-robin service and request batching in the model worker."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np
import pytest

from conftest import f32_diff
from shared.protocol import ScoreRequest
from teacher_server.backends.hf import HFBackend
from teacher_server.scheduler import USAGE_HALF_LIFE_S, FairScheduler, Overloaded, split_request


class CountingBackend(HFBackend):
    """The real backend, counting how many forward batches it ran."""

    calls: list[int]

    def score(self, requests):  # type: ignore[no-untyped-def]
        self.calls.append(len(requests))
        return super().score(requests)


@pytest.fixture(scope="module")
def backend(tiny_model: Path) -> CountingBackend:
    b = CountingBackend(str(tiny_model))
    b.calls = []
    return b


async def _blocked(scheduler: FairScheduler) -> tuple[threading.Event, asyncio.Task]:
    """Occupy the worker so that everything submitted next queues up."""
    gate = threading.Event()
    task = asyncio.create_task(scheduler.call("blocker", gate.wait))
    while not scheduler.busy:
        await asyncio.sleep(0.01)
    return gate, task


async def _queued(scheduler: FairScheduler, n: int) -> None:
    """Until `n` jobs wait behind the blocker: the tasks just created have queued theirs."""
    deadline = time.monotonic() + 60
    while scheduler.depth < n:
        assert time.monotonic() < deadline, f"{scheduler.depth} jobs queued, expected {n}"
        await asyncio.sleep(0.001)


async def test_light_client_is_not_starved(backend: CountingBackend) -> None:
    scheduler = FairScheduler(backend, max_queue=100, max_batch_tokens=3)  # no batching: one job per turn
    scheduler.start()
    gate, blocker = await _blocked(scheduler)
    done: list[str] = []

    async def job(client: str) -> None:
        await scheduler.score(client, ScoreRequest(sequences=[[1, 2, 3]], top_k=2))
        done.append(client)

    tasks = [asyncio.create_task(job("heavy")) for _ in range(10)]
    await _queued(scheduler, 10)
    tasks.append(asyncio.create_task(job("light")))
    await _queued(scheduler, 11)
    gate.set()
    await asyncio.gather(blocker, *tasks)
    await scheduler.stop()
    assert done.index("light") <= 1, done  # served in its first turn, not after ten heavy requests


async def test_large_request_is_chunked_so_a_light_client_waits_for_one_chunk(backend: CountingBackend) -> None:
    scheduler = FairScheduler(backend, max_queue=100, max_batch_tokens=6)
    scheduler.start()
    gate, blocker = await _blocked(scheduler)
    big = ScoreRequest(sequences=[[1, 2, 3 + i] for i in range(10)], start=[i % 3 for i in range(10)], top_k=3)
    order: list[str] = []

    async def job(client: str, req: ScoreRequest) -> list:
        out = await scheduler.score(client, req)
        order.append(client)
        return out

    heavy = asyncio.create_task(job("heavy", big))
    await _queued(scheduler, 5)  # its 5 chunks of at most 6 tokens
    light = asyncio.create_task(job("light", ScoreRequest(sequences=[[4, 5]], top_k=3)))
    await _queued(scheduler, 6)
    gate.set()
    chunked, _, _ = await asyncio.gather(heavy, light, blocker)
    await scheduler.stop()
    assert order == ["light", "heavy"]  # served between the heavy request's chunks
    (whole,) = backend.score([big])
    assert len(chunked) == 10
    for a, b in zip(chunked, whole, strict=True):
        assert a.start == b.start and (a.top_ids == b.top_ids).all()
        diff, tol = f32_diff(a.top_logprobs, b.top_logprobs)  # chunks are other batch shapes: other rounding
        assert diff <= tol, (diff, tol)


def test_split_request_keeps_order_starts_and_budget() -> None:
    req = ScoreRequest(sequences=[[1] * n for n in (4, 1, 5, 2, 2, 9, 1)], start=[3, 0, 4, 1, 0, 8, 0])
    parts = split_request(req, max_tokens=5)
    assert [p.sequences for p in parts][0] == [[1] * 4, [1]]
    assert [s for p in parts for s in p.sequences] == req.sequences
    assert [s for p in parts for s in p.starts()] == req.starts()
    assert all(sum(map(len, p.sequences)) <= 5 or len(p.sequences) == 1 for p in parts)
    assert split_request(req, max_tokens=100) == [req]


async def test_compatible_requests_share_one_forward(backend: CountingBackend) -> None:
    scheduler = FairScheduler(backend, max_queue=100, max_batch_tokens=10_000)
    scheduler.start()
    gate, blocker = await _blocked(scheduler)
    backend.calls.clear()
    reqs = [ScoreRequest(sequences=[[1, 2, 3 + i]], top_k=1 + i) for i in range(6)]
    tasks = [asyncio.create_task(scheduler.score(f"c{i % 3}", r)) for i, r in enumerate(reqs)]
    await _queued(scheduler, 6)
    gate.set()
    results = await asyncio.gather(*tasks)
    await blocker
    await scheduler.stop()
    assert backend.calls == [6]
    assert [r[0].top_ids.shape[1] for r in results] == [1, 2, 3, 4, 5, 6]  # each got its own top_k


async def test_full_queue_is_refused(backend: CountingBackend) -> None:
    scheduler = FairScheduler(backend, max_queue=2, max_batch_tokens=10)
    scheduler.start()
    gate, blocker = await _blocked(scheduler)
    queued = [asyncio.create_task(scheduler.score("a", ScoreRequest(sequences=[[1]]))) for _ in range(2)]
    await _queued(scheduler, 2)
    with pytest.raises(Overloaded):
        await scheduler.score("b", ScoreRequest(sequences=[[1]]))
    gate.set()
    await asyncio.gather(blocker, *queued)
    await scheduler.stop()


async def test_a_request_rides_along_only_with_a_larger_one(backend: CountingBackend) -> None:
    small, big = ScoreRequest(sequences=[[1, 2, 3]], top_k=2), ScoreRequest(sequences=[[1, 2, 3]] * 4, top_k=2)
    for first, second, expected in (("small", "big", [1, 1]), ("big", "small", [2])):
        scheduler = FairScheduler(backend, max_queue=100, max_batch_tokens=10_000)
        scheduler.start()
        gate, blocker = await _blocked(scheduler)
        backend.calls.clear()
        reqs = {"small": small, "big": big}
        tasks = [asyncio.create_task(scheduler.score(c, reqs[c])) for c in (first, second)]
        await _queued(scheduler, 2)
        gate.set()
        await asyncio.gather(blocker, *tasks)
        await scheduler.stop()
        # the small request never pays for the big one's tokens; it may join the big one's forward
        assert backend.calls == expected, (first, backend.calls)


def test_least_recent_use_goes_first_and_ties_to_the_client_served_longest_ago() -> None:
    scheduler = FairScheduler(backend=None, max_queue=10, max_batch_tokens=10)  # type: ignore[arg-type]
    now = time.monotonic()
    scheduler._queues = {c: deque([None]) for c in ("heavy-0", "heavy-1", "light")}  # type: ignore[list-item]
    scheduler._usage = {"heavy-0": (0.2, now), "heavy-1": (0.2, now), "light": (0.2, now)}
    scheduler._served = {"heavy-0": 41, "heavy-1": 42, "light": 30}
    assert scheduler._order() == ["light", "heavy-0", "heavy-1"]
    scheduler._usage["light"] = (0.25, now)  # recent use comes first
    assert scheduler._order() == ["heavy-0", "heavy-1", "light"]
    scheduler._usage["light"] = (0.5, now - 2 * USAGE_HALF_LIFE_S)  # more use, but longer ago: 0.125 now
    assert scheduler._order()[0] == "light"
    scheduler._executor.shutdown()


class _ModelClock:
    """The scheduler's clock in a test of its policy: time passes only while the model runs, 1 ms a
    forward, so every forward bills the same and a share is a count of forwards. (With the wall clock a
    forward preempted on a loaded machine bills many times its cost, and the client that happened to
    own it reads as over its share.)"""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    monotonic = perf_counter


async def test_a_client_under_its_share_is_served_next(backend: CountingBackend, monkeypatch) -> None:
    """Two clients keep the model busy; a third asks for less and never waits behind a queued job."""
    clock = _ModelClock()
    monkeypatch.setattr("teacher_server.scheduler.time", clock)

    def forward(requests):  # type: ignore[no-untyped-def]
        out = CountingBackend.score(backend, requests)
        clock.now += 0.001
        return out

    monkeypatch.setattr(backend, "score", forward)
    scheduler = FairScheduler(backend, max_queue=100, max_batch_tokens=3)
    scheduler.start()
    jumped: list[int] = []
    stop = asyncio.Event()

    async def busy(client: str) -> None:
        while not stop.is_set():
            await scheduler.score(client, ScoreRequest(sequences=[[1, 2, 3]], top_k=2))

    async def batches_after(n: int) -> None:
        deadline = time.monotonic() + 60
        while scheduler._batches < n:
            assert time.monotonic() < deadline, "the heavy clients stopped being served"
            await asyncio.sleep(0.001)

    async def light() -> None:
        # Both heavy clients must have been billed once: before that one of them ties with a client never
        # served (no use, no turn), and the tie goes to whoever queued first (seen on a loaded machine).
        while not all(c in scheduler._usage for c in ("heavy-0", "heavy-1")):
            await asyncio.sleep(0.005)
        for _ in range(10):
            # asks for at most a fifth of the model (the heavy clients two fifths each), counted in
            # forwards rather than seconds: the same demand on a quiet or a loaded machine
            await batches_after(scheduler._batches + 4)
            picked_before = scheduler._batches  # batches picked so far, the running one included
            await scheduler.score("light", ScoreRequest(sequences=[[1, 2, 3]], top_k=2))
            jumped.append(scheduler._served["light"] - picked_before - 1)  # picked ahead of this one
        stop.set()

    await asyncio.gather(busy("heavy-0"), busy("heavy-1"), light())
    await scheduler.stop()
    assert jumped == [0] * 10, jumped


async def test_long_prefill_runs_in_budget_sized_forwards_with_the_same_answers(backend: CountingBackend) -> None:
    prompts = [[1, *range(4, 6)], [1, *range(4, 12)], [1, *range(5, 18)]]  # 3, 9 and 14 tokens
    answers = {}
    for budget in (10_000, 8):  # one forward; then 2 tokens per row per forward
        scheduler = FairScheduler(backend, max_queue=100, max_batch_tokens=budget)
        scheduler.start()
        state, first = await scheduler.open_session("c", prompts, top_k=5)
        step = await scheduler.call("c", lambda state=state: backend.extend_session(state, [0, 2], [[7], [8, 9]], 5))
        await scheduler.stop()
        answers[budget] = (first, step, list(state.lengths), scheduler._batches)
    (whole, whole_step, whole_len, one), (chunked, chunked_step, chunked_len, many) = answers.values()
    assert one == 2 and many == 8  # 1 prefill + 1 extend; 7 prefill forwards (ceil(14 / 2)) + 1 extend
    assert whole_len == chunked_len == [4, 9, 16]
    for a, b in ((whole, chunked), (whole_step, chunked_step)):
        assert np.array_equal(a.top_ids, b.top_ids)
        for got, want in ((b.top_logprobs, a.top_logprobs), (b.tail_logprob, a.tail_logprob)):
            diff, tol = f32_diff(got, want)
            assert diff <= tol, (diff, tol)


async def test_all_positions_extend_runs_in_budget_sized_forwards_with_the_same_answers(
        backend: CountingBackend) -> None:
    """Over the budget, an extend that returns every position runs columns at a time; the entries
    keep a single call's order (row by row)."""
    prompts = [[1, 4], [1, 5, 6, 7], [2]]
    rows, tokens = [2, 0, 1], [[8, 9, 10, 11, 12], [13], [14, 15, 16]]
    answers = {}
    for budget in (10_000, 6):  # one forward; then 2 columns (6 // 3 rows) per forward
        scheduler = FairScheduler(backend, max_queue=100, max_batch_tokens=budget)
        scheduler.start()
        state, _ = await scheduler.open_session("c", prompts, top_k=5)
        before = scheduler._batches
        step = await scheduler.extend_session("c", state, rows, tokens, 5, all_positions=True)
        await scheduler.stop()
        answers[budget] = (step, list(state.lengths), scheduler._batches - before)
    (whole, whole_len, one), (split, split_len, many) = answers.values()
    assert (one, many) == (1, 3) and whole_len == split_len == [3, 7, 6]
    assert whole.top_ids.shape == (9, 5)
    assert np.array_equal(whole.top_ids, split.top_ids)
    for got, want in ((split.top_logprobs, whole.top_logprobs), (split.tail_logprob, whole.tail_logprob)):
        diff, tol = f32_diff(got, want)
        assert diff <= tol, (diff, tol)


ENGINES = [dict(backend="sglang", sglang_url="http://127.0.0.1:1"), dict(backend="vllm", vllm_url="http://127.0.0.1:1")]


def test_token_budget_defaults_to_small_forwards_only_for_a_cpu_model() -> None:
    from teacher_server.settings import ServerSettings

    assert ServerSettings(model="m").batch_tokens == 128
    assert ServerSettings(model="m", device="cuda").batch_tokens == 1024
    assert ServerSettings(model="m", max_batch_tokens=300).batch_tokens == 300
    for engine in ENGINES:  # an engine batches on its own: the budget is the largest request accepted
        assert ServerSettings(model="m", **engine).batch_tokens == ServerSettings(model="m").max_tokens == 65536
        assert ServerSettings(model="m", max_tokens=5000, device="cuda", **engine).batch_tokens == 5000
        assert ServerSettings(model="m", max_batch_tokens=300, **engine).batch_tokens == 300


class _EngineStandIn:
    """Records the tokens of each backend call, as an engine backend would send them to its engine."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def score(self, requests):  # type: ignore[no-untyped-def]
        self.calls.append(sum(len(s) for r in requests for s in r.sequences))
        return [[None] * len(r.sequences) for r in requests]


@pytest.mark.parametrize("engine", ENGINES, ids=["sglang", "vllm"])
async def test_an_engine_backend_gets_a_request_whole_at_the_default_budget(engine: dict) -> None:
    """The bench's request (32 sequences, 1,067 tokens) went out as two engine calls at the old 1024;
    now it and the largest request accepted (max_sequences x 256 = max_tokens) are one call each."""
    from teacher_server.settings import ServerSettings

    cfg, backend = ServerSettings(model="m", **engine), _EngineStandIn()
    scheduler = FairScheduler(backend, max_queue=100, max_batch_tokens=cfg.batch_tokens)  # type: ignore[arg-type]
    scheduler.start()
    bench = [[1] * (33 + (i % 3 == 0)) for i in range(32)]
    largest = [[1] * (cfg.max_tokens // cfg.max_sequences)] * cfg.max_sequences
    for seqs in (bench, largest):
        assert len(await scheduler.score("c", ScoreRequest(sequences=seqs, top_k=20))) == len(seqs)
    await scheduler.stop()
    assert backend.calls == [sum(map(len, bench)), cfg.max_tokens] and backend.calls[0] > 1024
