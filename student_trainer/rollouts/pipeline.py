"""Rollouts produced ahead of the learner, at most `train.max_staleness` optimizer steps ahead.

    producer (asyncio task, its own copy of the policy)      learner (worker thread)
    batch k   sampled by version v(k) = max(k - s, first)     step k-1 on batch k-1
    batch k+1 waits for version v(k+1), copies it, samples    step k   on batch k   ...

A policy *version* is the number of optimizer steps its weights have taken. Batch k (trained at
optimizer step k, with step k's ε, behavior and loss) is sampled by exactly version v(k): never
"whatever is newest", so a run is a function of its config, and a resumed run can reproduce it.
The learner publishes version j+1 when its update of step j returns; before it starts updating
the weights the producer still has to copy, it waits for that copy. Copies are in place
(`copy_` between two modules, on one device or across two: `student.rollout_device`), never
through disk, and one per version: batches of the version already in the producer's copy (at
staleness s, the first s+1 batches of a run) take none, since each copy bumps the weights'
version counters and makes the Qwen3 decode step re-fuse them (decoders/qwen3_decode.py).

Two producers (`train.producer`, docs/async.md). `thread`: an asyncio task of this process; its
decode loop awaits the teacher on the event loop, the same TeacherClient as everything else (fair
share, retries, session rebuilds), while the learner's backward runs in a worker thread; torch ops
release the GIL, so the two overlap when the machine has cores (or a GPU) to spare. `process`: the
same schedule, but `produce` hands the batch to a spawned process that decodes from a shared-memory
(or CUDA IPC) copy of the weights (producer_process.py); only the Python work leaves this process.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import torch

from student_trainer.config import ConfigError
from student_trainer.rollouts.rollout import Rollout


class PipelineError(RuntimeError):
    """The rollout producer died; the run stops (its last checkpoint stays on disk)."""


@dataclass
class Batch:
    """One optimizer step's rollouts (this rank's rows) and where they came from."""

    step: int  # the optimizer step (0-based) that trains on it
    version: int  # optimizer steps the sampling weights had taken
    rollouts: list[Rollout]
    rollout_s: float = 0.0
    producer_idle_s: float = 0.0  # the producer's wait for version `version` before sampling it


def sampling_version(step: int, staleness: int, first: int) -> int:
    """The policy version that samples batch `step` in a run (or resumed run) starting at step `first`."""
    return max(step - staleness, first)


@torch.no_grad()
def copy_weights(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    """dst's parameters and buffers := src's, in place (addresses kept: captured graphs stay valid),
    on one device or across two. On CUDA it returns once the copy is done, so the learner may then
    write `src` and another process may read `dst`."""
    for a, b in zip(dst.state_dict().values(), src.state_dict().values(), strict=True):
        a.copy_(b)
    for device in {a.device, b.device}:
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()


def producer_device(name: str | None, learner: torch.device, launched: bool = False) -> torch.device:
    """Where the producer's copy of the policy lives (`student.rollout_device`; None: the learner's
    device). Checked before any model is loaded, so a device this machine lacks fails at once."""
    if name is None:
        return learner
    if launched:
        raise ConfigError(f"student.rollout_device={name}: under torchrun each rank's producer uses that rank's "
                          "device; leave student.rollout_device unset")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ConfigError(f"student.rollout_device={name}: this machine has {count} CUDA device(s)"
                              f"{'' if count else ' (torch sees no CUDA)'}; use cpu or an existing cuda:N")
    return device


def producer_copy(source: torch.nn.Module, device: torch.device, shared: bool = False) -> torch.nn.Module:
    """The producer's own frozen copy of the policy on `device`; `shared`: in shared memory (on a
    CPU) so a producer process can read the weights the learner's side writes into it."""
    policy = copy.deepcopy(source).requires_grad_(False).eval().to(device)
    return policy.share_memory() if shared and device.type == "cpu" else policy


Produce = Callable[[int, torch.nn.Module], Awaitable[list[Rollout]]]


class Pipeline:
    """Runs `produce(step, policy)` ahead of the learner; the learner calls `train(step, learn)`.

    `ready` are batches restored from a checkpoint (the ones in flight when it was written);
    the producer starts at the first step after them. `policy` is the producer's copy of the
    weights (default: `producer_copy(source, source's device)`); `on_close` stops what `produce`
    runs on (a producer process).
    """

    def __init__(self, produce: Produce, source: torch.nn.Module, start: int, steps: int, staleness: int,
                 ready: dict[int, Batch] | None = None, policy: torch.nn.Module | None = None,
                 on_close: Callable[[], None] | None = None) -> None:
        self.produce, self.source, self.first, self.steps, self.staleness = produce, source, start, steps, staleness
        self.batches = dict(ready or {})
        self.next = start
        while self.next in self.batches:
            self.next += 1
        self.version = start  # the learner's: optimizer steps its weights have taken
        device = next(source.parameters()).device
        self.policy = policy if policy is not None else producer_copy(source, device)  # the producer's own
        self.held: int | None = None  # the version copied into `policy` (None: none yet, the first batch copies)
        self.on_close = on_close
        self.error: BaseException | None = None
        # the learner's own CUDA stream, so its kernels overlap the producer's
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._changed = asyncio.Condition()
        self._task: asyncio.Task | None = None

    def _version_of(self, step: int) -> int:
        return sampling_version(step, self.staleness, self.first)

    def start(self) -> Pipeline:
        self._task = asyncio.create_task(self._run(), name="rollout-producer")
        return self

    async def close(self) -> None:
        try:
            if self._task is not None and not self._task.done():
                self._task.cancel()
                try:
                    await self._task
                except (asyncio.CancelledError, Exception):
                    pass
        finally:
            if self.on_close is not None:
                self.on_close()

    async def _until(self, ready: Callable[[], bool]) -> float:
        """Wait for `ready()` (or the producer's death, raised here); returns the seconds waited."""
        started = time.perf_counter()
        async with self._changed:
            await self._changed.wait_for(lambda: self.error is not None or ready())
        if self.error is not None:
            raise PipelineError(f"the rollout producer died before batch {self.next}: {self.error!r}") from self.error
        return time.perf_counter() - started

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _run(self) -> None:
        try:
            while self.next < self.steps:
                k, v = self.next, self._version_of(self.next)
                idle = await self._until(lambda v=v: self.version >= v)
                if v != self.held:  # one copy per version: each copy makes a decoder re-fuse its weights
                    # the learner waits for this copy, and no `produce` runs (a process reads `policy` only in it)
                    copy_weights(self.policy, self.source)
                    self.held = v
                self.next += 1  # batch k has its weights: the learner may move on
                await self._notify()
                started = time.perf_counter()
                rollouts = await self.produce(k, self.policy)
                self.batches[k] = Batch(k, v, rollouts, time.perf_counter() - started, idle)
                await self._notify()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # raised to the learner, at its next wait (PipelineError)
            self.error = exc
            await self._notify()

    def _copy_pending(self, step: int) -> bool:
        """Does a batch not yet started still need a copy of version `step` (or older)? The batches of the
        version already in `policy` need none (versions only grow: the first other one is the next copy)."""
        k = self.next
        while k < self.steps and self._version_of(k) == self.held:
            k += 1
        return k < self.steps and self._version_of(k) <= step

    async def train(self, step: int, learn: Callable[[list[Rollout]], dict[str, Any]]) -> dict[str, Any]:
        """Optimizer step `step` on its batch: `learn` runs in a worker thread while the producer
        samples the next batches; returns learn's record with where the batch came from."""
        idle = await self._until(lambda: step in self.batches)
        idle += await self._until(lambda: not self._copy_pending(step))
        batch = self.batches.pop(step)
        started = time.perf_counter()
        record = await asyncio.to_thread(self._learn, learn, batch.rollouts)
        update_s = time.perf_counter() - started
        self.version = step + 1
        await self._notify()
        step_s = idle + update_s  # the step's wall time, as the synchronous loop measures it
        return {**record, "step_s": step_s, "tokens_per_s": record["tokens"] / step_s,
                "policy_version": batch.version, "staleness": step - batch.version,
                "rollout_s": batch.rollout_s, "update_s": update_s, "learner_idle_s": idle,
                "producer_idle_s": batch.producer_idle_s}

    def _learn(self, learn: Callable[[list[Rollout]], dict[str, Any]], rollouts: list[Rollout]) -> dict[str, Any]:
        """`learn` in the worker thread; on CUDA on a stream of its own (a thread's current stream is
        its own), finished before the producer may read the new weights."""
        if self.stream is None:
            return learn(rollouts)
        with torch.cuda.stream(self.stream):
            record = learn(rollouts)
        self.stream.synchronize()
        return record

    async def in_flight(self, step: int) -> dict[int, Batch]:
        """The batches from `step` on that were sampled by versions before `step` (waiting for any
        still being sampled): what a checkpoint at `step` must hold to resume exactly."""
        wanted = [k for k in range(step, self.steps) if self._version_of(k) < step]
        try:
            await self._until(lambda: all(k in self.batches for k in wanted))
        except PipelineError:  # still write the checkpoint; the next step raises
            pass
        return {k: self.batches[k] for k in wanted if k in self.batches}
