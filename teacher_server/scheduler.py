"""Clients share the model fairly, and compatible score requests share a forward.

Why a scheduler: a shared teacher serves many experiments at once. FIFO would let one client with
a deep queue starve everyone else, and plain round-robin still makes a light client wait behind
one request of every heavy client. So each client has its own queue, and the model always serves
the queued client that has used the least model time *lately* (each second of use counts half as
much one half-life later): least attained service with forgetting. Clients that ask for the same
time are served in turn; a client that uses less than the others is served as soon as the running
job ends; and one back from idle is served first only until its recent use catches up with the
others', so it can bank no more credit than a half-life's worth. Ties go to the client served
longest ago. (We first used start-time fair queuing, which clamps a returning client to the least
virtual time in the queue: trainer-like clients return from idle after every request, so everyone
sat at that minimum and a light client lost most ties to heavy ones.)

Score requests that arrive together are batched into one backend call (up to a token budget);
session steps run alone because each owns its KV cache. A request joins a batch only if it is at
most twice the size of the batch's first (least served) request: a small request may ride along
with a big one, not the reverse, or the light client would pay for the heavy one's tokens. The
same budget bounds how long the model is held at once: a score request larger than the budget is
split by sequences into chunks that queue one after another, and a long session prefill or an
extend that returns every position runs as several forwards (`open_session`, `extend_session`), so a
light client waits for at most one chunk, never a whole heavy request (chunked prefill, as serving
engines do for the same reason).

Each job carries a fingerprint for the poison-request quarantine (`quarantine.py`): a job that was
in a crash runs alone, and one in two crashes is refused before it is queued.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shared.protocol import ScoreRequest, SequenceScores
from teacher_server.backends.base import Backend, SessionState, StepArrays
from teacher_server.quarantine import Quarantine, Quarantined, fingerprint
from teacher_server.worker import WorkerCrashed

# (seconds queued, seconds on the model) of the request handled in this task, for `Server-Timing`:
# a client can tell the teacher's queueing from its own and the network's share of a latency.
TIMING: contextvars.ContextVar[tuple[float, float] | None] = contextvars.ContextVar("timing", default=None)


USAGE_HALF_LIFE_S = 1.0  # how fast past use is forgiven: the span over which shares are equalised


class Overloaded(RuntimeError):
    """The queue is full; the client should retry later."""


@dataclass
class _Job:
    client: str
    tokens: int
    request: ScoreRequest | None = None  # a score job when set
    call: Callable[[], Any] | None = None  # otherwise: run this on the model thread
    fingerprint: str = ""  # what the quarantine knows the request by ("" for session extends)
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    queued_at: float = field(default_factory=time.perf_counter)
    started_at: float = 0.0
    model_s: float = 0.0


class FairScheduler:
    def __init__(self, backend: Backend, max_queue: int, max_batch_tokens: int,
                 on_charge: Callable[[str, float], None] | None = None,
                 quarantine: Quarantine | None = None) -> None:
        self.backend = backend
        self.quarantine = quarantine or Quarantine()
        self.on_charge = on_charge  # told each client's model seconds (the metrics)
        self.max_queue = max_queue
        self.max_batch_tokens = max_batch_tokens
        self._queues: dict[str, deque[_Job]] = {}
        self._usage: dict[str, tuple[float, float]] = {}  # client -> (recent model seconds, as of when)
        self._served: dict[str, int] = {}  # number of the batch that last served each client (tie-break)
        self._batches = 0
        self._depth = 0
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher-model")
        self._task: asyncio.Task | None = None
        self.busy = False

    @property
    def depth(self) -> int:
        """Jobs waiting (not counting the one running)."""
        return self._depth

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="teacher-scheduler")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=False)  # a call in flight ends when the backend closes (worker.py)

    async def score(self, client: str, request: ScoreRequest) -> list[SequenceScores]:
        jobs = [_Job(client=client, tokens=sum(len(s) for s in part.sequences), request=part,
                     fingerprint=fingerprint("score", part.sequences, part.model_dump_json(exclude={"sequences"})))
                for part in split_request(request, self.max_batch_tokens)]
        return [seq for part in await self._run_jobs(jobs) for seq in part]

    async def open_session(self, client: str, sequences: list[list[int]],
                           top_k: int) -> tuple[SessionState, StepArrays]:
        """Prefill a session in forwards of at most the token budget, each in the client's turn.

        Why: one long prefill would hold the model as long as an unchunked score request (chunked
        prefill). The first forward takes every row's first `width` tokens, the next ones extend the
        rows that are longer; each row's answer is the step where its prompt ended.
        """
        backend, tokens = self.backend, sum(len(s) for s in sequences)
        fp = fingerprint("open", sequences, f"top_k={top_k}")  # every chunk is blamed on the whole request
        if tokens <= self.max_batch_tokens or not backend.info.kv_sessions:
            return await self.call(client, lambda: backend.open_session(sequences, top_k), tokens, fp)
        width = max(1, self.max_batch_tokens // len(sequences))
        head = [s[:width] for s in sequences]
        state, step = await self.call(client, lambda: backend.open_session(head, top_k), sum(map(len, head)), fp)
        # rows whose prompt ended in the first forward keep its answer; later forwards overwrite the rest
        answer = StepArrays(step.top_ids.copy(), step.top_logprobs.copy(), step.tail_logprob.copy())
        for offset in range(width, max(map(len, sequences)), width):
            rows = [r for r, s in enumerate(sequences) if len(s) > offset]
            part = [sequences[r][offset : offset + width] for r in rows]
            step = await self.call(
                client, lambda rows=rows, part=part: backend.extend_session(state, rows, part, top_k),
                sum(map(len, part)), fp)
            ended = [i for i, r in enumerate(rows) if len(sequences[r]) <= offset + width]
            _fill(answer, [rows[i] for i in ended], step, ended)
        return state, answer

    async def extend_session(self, client: str, state: SessionState, rows: list[int], tokens: list[list[int]],
                             top_k: int, all_positions: bool = False) -> StepArrays:
        """A session step; one that returns every position and is over the token budget runs as
        several forwards of at most the budget, columns at a time, as a long prefill does (it also
        bounds the [tokens x vocab] logits a forward holds). Answers keep the order of a single call."""
        backend, total = self.backend, sum(map(len, tokens))
        if not all_positions or total <= self.max_batch_tokens or not backend.info.kv_sessions:
            return await self.call(
                client, lambda: backend.extend_session(state, rows, tokens, top_k, all_positions), total)
        width = max(1, self.max_batch_tokens // len(rows))
        parts: list[StepArrays] = []
        entries: list[list[int]] = [[] for _ in rows]  # each row's entries in the pieces' concatenation
        done = 0
        for offset in range(0, max(map(len, tokens)), width):
            live = [i for i, t in enumerate(tokens) if len(t) > offset]
            part = [tokens[i][offset : offset + width] for i in live]
            parts.append(await self.call(
                client, lambda live=live, part=part: backend.extend_session(
                    state, [rows[i] for i in live], part, top_k, True), sum(map(len, part))))
            for i, toks in zip(live, part, strict=True):
                entries[i] += range(done, done + len(toks))
                done += len(toks)
        order = [e for row in entries for e in row]  # row by row, as a single call answers
        return StepArrays(*(np.concatenate([getattr(p, f) for p in parts])[order]
                            for f in ("top_ids", "top_logprobs", "tail_logprob")))

    async def call(self, client: str, fn: Callable[[], Any], tokens: int = 1, fingerprint: str = "") -> Any:
        """Run `fn` on the model thread in this client's turn (session steps)."""
        (result,) = await self._run_jobs([_Job(client=client, tokens=tokens, call=fn, fingerprint=fingerprint)])
        return result

    async def _run_jobs(self, jobs: list[_Job]) -> list[Any]:
        """Queue one request's jobs (its chunks, in order) and wait for all of them."""
        if self._depth >= self.max_queue:
            raise Overloaded(f"the teacher queue is full ({self.max_queue} requests waiting)")
        if any(self.quarantine.blocked(j.fingerprint) for j in jobs):
            raise _refusal()
        self._queues.setdefault(jobs[0].client, deque()).extend(jobs)
        self._depth += len(jobs)
        self._wakeup.set()
        try:
            return await asyncio.gather(*(job.future for job in jobs))
        finally:
            _report(jobs)

    def _recent(self, client: str, now: float) -> float:
        """Model seconds `client` used lately, each second's weight halving every USAGE_HALF_LIFE_S."""
        used, when = self._usage.get(client, (0.0, now))
        return used * 0.5 ** ((now - when) / USAGE_HALF_LIFE_S)

    def _order(self) -> list[str]:
        """Least recent use first; among equals, the client served longest ago."""
        now = time.monotonic()
        return sorted(self._queues, key=lambda c: (self._recent(c, now), self._served.get(c, 0)))

    def _pop_from(self, client: str) -> _Job | None:
        queue = self._queues[client]
        job = queue.popleft()
        self._depth -= 1
        if not queue:
            del self._queues[client]
        if not job.future.done() and self.quarantine.blocked(job.fingerprint):  # quarantined while queued
            job.future.set_exception(_refusal())
        return None if job.future.done() else job  # a client that hung up: skip its job

    def _next_batch(self) -> list[_Job]:
        """The least-served client's next job, plus other clients' score jobs that fit alongside."""
        while self._queues:
            first = self._pop_from(self._order()[0])
            if first is not None:
                break
        else:
            return []
        if first.request is None or self.quarantine.suspect(first.fingerprint):
            return [first]  # session steps own their cache; a suspect runs alone, to be blamed alone
        batch, tokens, grew = [first], first.tokens, True
        while grew:  # pass over the clients, least served first, until nothing more fits
            grew = False
            for client in self._order():
                head = self._queues[client][0]
                if (head.request is None or self.quarantine.suspect(head.fingerprint)
                        or head.tokens > 2 * first.tokens or tokens + head.tokens > self.max_batch_tokens):
                    continue
                job = self._pop_from(client)
                grew = True
                if job is not None:
                    batch.append(job)
                    tokens += job.tokens
        return batch

    def _charge(self, batch: list[_Job], seconds: float) -> None:
        """Bill each client its share of the model time, by tokens; forget clients long idle."""
        now, total = time.monotonic(), sum(j.tokens for j in batch) or 1
        for job in batch:
            share = seconds * job.tokens / total
            self._usage[job.client] = (self._recent(job.client, now) + share, now)
            if self.on_charge is not None:
                self.on_charge(job.client, share)
        for client in [c for c in self._usage if c not in self._queues and self._recent(c, now) < 1e-6]:
            del self._usage[client]
            self._served.pop(client, None)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            batch = self._next_batch()
            if not batch:
                self._wakeup.clear()
                continue
            self.busy = True
            self._batches += 1
            for job in batch:
                self._served[job.client] = self._batches
            try:
                if batch[0].request is not None:
                    fn = lambda b=batch: self.backend.score([j.request for j in b])  # noqa: E731
                else:
                    fn = batch[0].call
                started = time.perf_counter()
                for job in batch:
                    job.started_at = started
                results = await loop.run_in_executor(self._executor, fn)
                seconds = time.perf_counter() - started
                for job in batch:
                    job.model_s = seconds
                self._charge(batch, seconds)
                if batch[0].request is None:
                    results = [results]
                for job, result in zip(batch, results, strict=True):
                    if not job.future.done():
                        job.future.set_result(result)
            except Exception as exc:  # delivered to each waiting request, which answers 503 or 500
                crashed = isinstance(exc, WorkerCrashed)  # died running this batch
                newly = self.quarantine.strike(j.fingerprint for j in batch) if crashed else set()
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(_refusal() if job.fingerprint in newly else exc)
            finally:
                self.busy = False


def _refusal() -> Quarantined:
    return Quarantined("this request crashed the model twice; it is refused for a while (quarantined), "
                       "do not retry it")


def _fill(answer: StepArrays, rows: list[int], step: StepArrays, picks: list[int]) -> None:
    """Copy `step`'s answers at `picks` into `answer`'s `rows`."""
    answer.top_ids[rows] = step.top_ids[picks]
    answer.top_logprobs[rows] = step.top_logprobs[picks]
    answer.tail_logprob[rows] = step.tail_logprob[picks]


def _report(jobs: list[_Job]) -> None:
    """Set `TIMING` for the calling task: time until the first chunk ran, model time of all chunks."""
    if all(j.started_at for j in jobs):
        TIMING.set((jobs[0].started_at - jobs[0].queued_at, sum(j.model_s for j in jobs)))


def split_request(request: ScoreRequest, max_tokens: int) -> list[ScoreRequest]:
    """Consecutive groups of sequences of at most `max_tokens` tokens (one sequence may exceed it)."""
    starts, groups, current, size = request.starts(), [], [], 0
    for i, seq in enumerate(request.sequences):
        if current and size + len(seq) > max_tokens:
            groups.append(current)
            current, size = [], 0
        current.append(i)
        size += len(seq)
    groups.append(current)
    if len(groups) == 1:
        return [request]
    return [request.model_copy(update={"sequences": [request.sequences[i] for i in g],
                                       "start": [starts[i] for i in g]}) for g in groups]
