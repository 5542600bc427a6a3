"""One worker owns the model; clients take turns, and compatible score requests share a forward.

Why a scheduler: a shared teacher serves many experiments at once. FIFO would let one client with
a deep queue starve everyone else, so each client has its own queue and the worker serves them
round-robin. Score requests that arrive together are batched into one backend call (up to a token
budget); session steps run alone because each owns its KV cache.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from shared.protocol import ScoreRequest, SequenceScores
from teacher_server.backends.base import Backend


class Overloaded(RuntimeError):
    """The queue is full; the client should retry later."""


@dataclass
class _Job:
    client: str
    tokens: int
    request: ScoreRequest | None = None  # a score job when set
    call: Callable[[], Any] | None = None  # otherwise: run this on the model thread
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class FairScheduler:
    def __init__(self, backend: Backend, max_queue: int, max_batch_tokens: int) -> None:
        self.backend = backend
        self.max_queue = max_queue
        self.max_batch_tokens = max_batch_tokens
        self._queues: OrderedDict[str, deque[_Job]] = OrderedDict()
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
        self._executor.shutdown(wait=True)

    async def score(self, client: str, request: ScoreRequest) -> list[SequenceScores]:
        tokens = sum(len(s) for s in request.sequences)
        return await self._submit(_Job(client=client, tokens=tokens, request=request))

    async def call(self, client: str, fn: Callable[[], Any], tokens: int = 1) -> Any:
        """Run `fn` on the model thread in this client's turn (session steps)."""
        return await self._submit(_Job(client=client, tokens=tokens, call=fn))

    async def _submit(self, job: _Job) -> Any:
        if self._depth >= self.max_queue:
            raise Overloaded(f"the teacher queue is full ({self.max_queue} requests waiting)")
        self._queues.setdefault(job.client, deque()).append(job)
        self._depth += 1
        self._wakeup.set()
        return await job.future

    def _pop(self) -> _Job | None:
        """The head job of the next client in round-robin order, skipping cancelled ones."""
        while self._queues:
            client, queue = next(iter(self._queues.items()))
            job = queue.popleft()
            self._depth -= 1
            if queue:
                self._queues.move_to_end(client)
            else:
                del self._queues[client]
            if not job.future.done():
                return job
        return None

    def _peek_is_score(self) -> bool:
        return bool(self._queues) and next(iter(self._queues.values()))[0].request is not None

    def _next_batch(self) -> list[_Job]:
        first = self._pop()
        if first is None or first.request is None:
            return [first] if first else []
        batch, tokens = [first], first.tokens
        while self._peek_is_score():
            head = next(iter(self._queues.values()))[0]
            if tokens + head.tokens > self.max_batch_tokens:
                break
            job = self._pop()
            if job is not None:
                batch.append(job)
                tokens += job.tokens
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            batch = self._next_batch()
            if not batch:
                self._wakeup.clear()
                continue
            self.busy = True
            try:
                if batch[0].request is not None:
                    fn = lambda: self.backend.score([j.request for j in batch])  # noqa: E731
                else:
                    fn = batch[0].call
                results = await loop.run_in_executor(self._executor, fn)
                if batch[0].request is None:
                    results = [results]
                for job, result in zip(batch, results, strict=True):
                    if not job.future.done():
                        job.future.set_result(result)
            except Exception as exc:  # delivered to each waiting request, which answers 500
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
            finally:
                self.busy = False
