"""The rollout producer in a process of its own (`train.producer: process`, docs/async.md).

    trainer process (learner, pipeline.py)              producer process (spawned, one per rank)
    wait for version v(k); copy_ it into the shared   ──▶ shared weights (share_memory_ on a CPU,
      copy, if not there yet (producer idle)              the same CUDA memory through IPC on a GPU)
    send (k, written since the last batch?)            ──▶ rollout_batch(k) from those weights, its own
                                                           event loop and TeacherClient (same id)
    batch k (pickled rollouts)                         ◀── send

The schedule and the version handshake are the thread producer's (pipeline.Pipeline): only
`produce` differs. The trainer writes the shared copy only between batches (its `produce` has
returned), so the producer never reads a half-written update and neither side locks anything.
Weights never go through disk; rollouts come back pickled by value over a pipe (a batch's tokens,
masks and teacher top-k: B·T·k·12 bytes) rather than as shared-memory tensors, because a rollout
holds one small tensor per decode step and torch shares each through a file descriptor of its own.

Failure: a producer that raises sends its traceback; one that dies (a signal, the OOM killer)
closes its end of the pipe. Either way the waiting `produce` raises ProducerDied within half a
second, which the pipeline turns into PipelineError at the learner's next wait; the checkpoint
on disk is the trainer's and stays intact. `close` stops the process (asked, then terminated,
then killed) and the process exits by itself when its trainer dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import pickle
import signal
import sys
import traceback
from contextlib import AsyncExitStack
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

import torch
import torch.multiprocessing as mp

from student_trainer import startup
from student_trainer.config import DEFAULT_TEACHER, Config
from student_trainer.data import TaskData
from student_trainer.rollouts.batch import RolloutSource, rollout_batch
from student_trainer.rollouts.offline_data import OfflineData
from student_trainer.rollouts.rollout import Rollout
from student_trainer.teacher.client import TeacherClient
from student_trainer.training.distributed import Dist

POLL_S = 0.5  # how often a wait looks at the other side's liveness


class ProducerDied(RuntimeError):
    """The producer process raised, exited or was killed."""


@dataclass
class ProducerSpec:
    """What the producer process needs besides the weights, pickled once at spawn."""

    cfg: Config
    tokenizer: Any
    urls: dict[str, list[str]]  # the trainer's teachers by id, their replicas (local teachers' URLs included)
    client_id: str  # the trainer's: one fair-share client on each server
    rank: int
    world: int
    device: torch.device

    @classmethod
    def of(cls, run: RolloutSource, device: torch.device) -> ProducerSpec:
        urls = {tid: [r.url for r in client.replicas] for tid, client in run.teachers.items()}
        return cls(run.cfg, run.tokenizer, urls, run.teachers[DEFAULT_TEACHER].client_id, run.dist.rank,
                   run.dist.world, device)


@dataclass
class ProducerRun:
    """The parts of the trainer's Run that `rollout_batch` reads (a RolloutSource), rebuilt in the producer process."""

    cfg: Config
    tokenizer: Any
    teachers: dict[str, TeacherClient]
    data: TaskData
    dist: Dist
    offline: OfflineData | None


class ProducerProcess:
    """The trainer's handle on its producer process: `await produce(step, policy)`, then `close()`.

    `policy` is the shared copy the process decodes from; the caller writes it only while no
    `produce` is running. The process starts here (spawn: a fresh interpreter, a few seconds).
    """

    def __init__(self, spec: ProducerSpec, policy: torch.nn.Module) -> None:
        ctx = mp.get_context("spawn")
        commands, self._commands = ctx.Pipe(duplex=False)
        self._replies, replies = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=_main, args=(spec, policy, commands, replies), name="rollout-producer",
                                   daemon=True)
        self.process.start()
        commands.close()  # the child holds these ends now: its death closes `replies` for good
        replies.close()
        self._asked = self._busy = self._closed = False
        self._sent: tuple[int, ...] | None = None  # the shared weights' write counts at the last batch sent
        self.refreshes = 0  # batches sent with weights written since the previous one (each one a re-fuse)

    @property
    def pid(self) -> int | None:
        return self.process.pid

    async def produce(self, step: int, policy: torch.nn.Module) -> list[Rollout]:
        """Batch `step`, sampled by the process from the shared weights (`policy`, written before).
        The process is told whether they were written since its last batch: this side's version
        counters see the writes (`copy_`), the process's do not."""
        written = write_counts(policy)
        changed, self._sent = written != self._sent, written
        self.refreshes += changed
        with contextlib.suppress(OSError):  # else it is gone: its last words, if any, are in the replies
            self._commands.send((step, changed))
        self._asked = self._busy = True
        while True:
            kind, *rest = await asyncio.to_thread(self._receive)
            if kind == "batch":
                if rest[0] != step:
                    raise ProducerDied(f"the rollout producer sent batch {rest[0]} for batch {step}")
                self._busy = False
                return rest[1]
            if kind == "error":
                raise ProducerDied(f"the rollout producer process failed:\n{rest[0]}")
            # "ready": its start-up is done; the batch follows

    def _receive(self) -> tuple:
        while not self._closed:
            ready = wait([self._replies, self.process.sentinel], timeout=POLL_S)
            if self._replies in ready:
                try:
                    return pickle.loads(self._replies.recv_bytes())
                except EOFError:  # closed, mid-message or between messages
                    raise ProducerDied(self._death()) from None
            if ready:  # exited without a word
                raise ProducerDied(self._death())
        raise ProducerDied("the rollout producer was closed")

    def _death(self) -> str:
        self.process.join(timeout=POLL_S)
        code = self.process.exitcode
        if code is None:
            return f"the rollout producer process (pid {self.pid}) closed its pipe"
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else \
            f"exited with status {code} (its traceback, if any, is on stderr)"
        return f"the rollout producer process (pid {self.pid}) {how}"

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the process: asked when idle between batches (its teacher client closes), else (still
        starting, or mid-batch) terminated; never left running."""
        self._closed = True
        p = self.process
        if p.is_alive() and self._asked and not self._busy:
            with contextlib.suppress(OSError):
                self._commands.send(None)
            p.join(timeout_s)
        if p.is_alive():
            p.terminate()
            p.join(timeout_s)
        if p.is_alive():
            p.kill()
            p.join()
        self._commands.close()


# ---- in the producer process ----

def _main(spec: ProducerSpec, policy: torch.nn.Module, commands: Connection, replies: Connection) -> None:
    """The producer process: set up like the trainer, then one batch per command until None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle; it stops us
    try:
        if spec.cfg.train.threads:
            torch.set_num_threads(spec.cfg.train.threads)
        if spec.device.type == "cuda":
            torch.cuda.set_device(spec.device)
        asyncio.run(_serve(spec, policy, commands, replies))
    except BaseException:
        with contextlib.suppress(OSError):
            replies.send_bytes(pickle.dumps(("error", traceback.format_exc())))
        sys.exit(1)


async def _serve(spec: ProducerSpec, policy: torch.nn.Module, commands: Connection, replies: Connection) -> None:
    cfg, tok = spec.cfg, spec.tokenizer
    async with AsyncExitStack() as stack:
        teachers = await startup.open_teachers(stack, cfg, spec.urls, spec.client_id, tok, report=startup.quiet)
        offline = OfflineData.open(cfg.data.offline_path, tok.pad_token_id, cfg.data.seed) \
            if cfg.method.name == "offline_kd" else None
        run = ProducerRun(cfg, tok, teachers, TaskData(cfg.data, tok), Dist(spec.rank, spec.world, spec.device),
                          offline)
        replies.send_bytes(pickle.dumps(("ready",)))
        while (command := _command(commands)) is not None:
            step, changed = command
            if changed:
                _written_elsewhere(policy)
            rollouts = await rollout_batch(run, step, policy)
            replies.send_bytes(pickle.dumps(("batch", step, rollouts)))


def write_counts(policy: torch.nn.Module) -> tuple[int, ...]:
    """Each weight's version counter in this process: changes whenever one is written in place (`copy_`)."""
    return tuple(tensor._version for tensor in policy.state_dict().values())


def _written_elsewhere(policy: torch.nn.Module) -> None:
    """The trainer wrote these weights (shared memory, CUDA IPC) since the last batch, which this
    process's version counters cannot see: bump them, so what is keyed on a weight's version (the
    Qwen3 decoder's fused copies, decoders/qwen3_decode.py) is rebuilt. Only then: a needless bump
    costs a re-fuse (1-2 s for a 0.6B model on a GPU)."""
    for tensor in policy.state_dict().values():
        torch.autograd.graph.increment_version(tensor)


def _command(commands: Connection) -> tuple[int, bool] | None:
    """The next step to roll out and whether its weights were written since the last one; None to
    stop (asked, or the trainer is gone)."""
    parent = multiprocessing.parent_process()
    while not commands.poll(POLL_S):
        if parent is not None and not parent.is_alive():
            return None
    try:
        return commands.recv()
    except EOFError:
        return None
