"""The rollout producer runs ahead of the learner by max_staleness steps, exactly, and resumes exactly."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO
from student_trainer.config import load_config
from student_trainer.reports.metrics_file import read_metrics
from student_trainer.rollouts.pipeline import Batch, Pipeline, PipelineError, sampling_version
from student_trainer.training import checkpoint
from student_trainer.training import loop as train


def test_sampling_version() -> None:
    assert [sampling_version(k, 0, 0) for k in range(4)] == [0, 1, 2, 3]
    assert [sampling_version(k, 1, 0) for k in range(4)] == [0, 0, 1, 2]
    assert [sampling_version(k, 2, 3) for k in range(3, 7)] == [3, 3, 3, 4]  # resumed at step 3


async def _fake_run(staleness: int, start: int = 0, steps: int = 6, ready: dict | None = None,
                    die_at: int | None = None, copies: list | None = None) -> tuple[dict[int, float], list[dict]]:
    """The weight is the version (the learner adds 1 per step), so a batch's sampled value is the
    version that sampled it; the producer yields to the loop mid-batch like a real decode loop.
    `copies` gets the writes into the producer's copy (its weight's version counter: what the Qwen3
    decode step's fused weights are keyed on)."""
    source = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        source.weight.fill_(start)
    sampled: dict[int, float] = {}

    async def produce(k: int, policy: torch.nn.Module) -> list:
        if k == die_at:
            raise ValueError("decode failed")
        first = float(policy.weight)
        await asyncio.sleep(0.001)
        sampled[k] = float(policy.weight)
        assert sampled[k] == first  # never changed under a batch
        return []

    def learn(rollouts: list) -> dict:
        with torch.no_grad():
            source.weight.add_(1.0)
        return {"tokens": 1}

    pipe = Pipeline(produce, source, start, steps, staleness, ready)
    written = pipe.policy.weight._version
    pipe.start()
    try:
        records = [await pipe.train(k, learn) for k in range(start, steps)]
    finally:
        await pipe.close()
    if copies is not None:
        copies.append(pipe.policy.weight._version - written)
    return sampled, records


@pytest.mark.parametrize("staleness", [1, 2])
def test_each_batch_is_sampled_by_exactly_its_version(staleness: int) -> None:
    sampled, records = asyncio.run(_fake_run(staleness))
    assert sampled == {k: float(max(k - staleness, 0)) for k in range(6)}
    assert [r["policy_version"] for r in records] == [max(k - staleness, 0) for k in range(6)]
    assert [r["staleness"] for r in records] == [min(k, staleness) for k in range(6)]


@pytest.mark.parametrize(("staleness", "start", "ready"), [
    (1, 0, None), (2, 0, None), (2, 3, {3: Batch(3, 2, []), 4: Batch(4, 3, [])}), (3, 0, None)])
def test_the_producer_copies_each_version_once(staleness: int, start: int, ready: dict | None) -> None:
    """Batches of one version share one copy (at staleness 1, batches 0 and 1 are both version 0);
    the first batch after a resume still gets its own."""
    copies: list[int] = []
    sampled, _ = asyncio.run(_fake_run(staleness, start=start, steps=8, ready=ready, copies=copies))
    produced = [k for k in range(start, 8) if k not in (ready or {})]
    assert sampled == {k: float(sampling_version(k, staleness, start)) for k in produced}
    assert copies == [len(set(sampled.values()))]


def test_the_learner_waits_only_for_copies_still_to_make() -> None:
    """At staleness 2 batches 0-2 are version 0, already in the producer's copy: step 0's update need not
    wait for batch 1 to be sampled (here batch 1 waits for that update), only batch 3 (version 1) copies."""
    source = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        source.weight.fill_(0.0)
    sampled: dict[int, float] = {}
    updated = threading.Event()  # set by the learner's thread

    async def produce(k: int, policy: torch.nn.Module) -> list:
        deadline = time.monotonic() + 5
        while k == 1 and not updated.is_set():
            assert time.monotonic() < deadline, "step 0's update waited for batch 1"
            await asyncio.sleep(0.001)
        sampled[k] = float(policy.weight)
        return []

    def learn(rollouts: list) -> dict:
        with torch.no_grad():
            source.weight.add_(1.0)
        updated.set()
        return {"tokens": 1}

    async def run() -> None:
        pipe = Pipeline(produce, source, 0, 5, 2).start()
        try:
            for k in range(5):
                await pipe.train(k, learn)
        finally:
            await pipe.close()

    asyncio.run(run())
    assert sampled == {0: 0.0, 1: 0.0, 2: 0.0, 3: 1.0, 4: 2.0}


def test_resumed_pipeline_takes_restored_batches_first() -> None:
    ready = {3: Batch(3, 2, []), 4: Batch(4, 3, [])}  # in flight at a checkpoint at step 3 (staleness 2)
    sampled, records = asyncio.run(_fake_run(2, start=3, steps=8, ready=ready))
    assert sampled == {5: 3.0, 6: 4.0, 7: 5.0}
    assert [r["policy_version"] for r in records] == [2, 3, 3, 4, 5]


def test_a_dead_producer_fails_the_learner_loudly() -> None:
    with pytest.raises(PipelineError, match="decode failed"):
        asyncio.run(_fake_run(1, die_at=3))


# ---- the real trainer against a real teacher server ----

def _cfg(task_models: tuple[Path, Path], url: str, out: Path, *extra: str):
    return load_config(None, [f"student.path={task_models[1]}", f"teacher.url={url}", "teacher.top_k=8",
                              "train.batch_size=4", "train.max_new_tokens=12", "train.eval_every=0",
                              "train.save_every=2", f"train.out_dir={out}", "train.progress=false",
                              "data.eval_size=4", "data.probe_size=4", "method.name=trb", "method.eps0=0.2",
                              "method.horizon=4", "optim.lr=0.01", *extra])


class Killed(Exception):
    pass


def _steps(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def test_staleness_one_run_learns_on_batches_one_version_old(task_models, task_teacher, tmp_path) -> None:
    summary = train.train_sync(_cfg(task_models, task_teacher.url, tmp_path, "train.steps=8",
                                    "train.max_staleness=1"))
    records = _steps(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert [r["policy_version"] for r in records] == [0] + [k - 1 for k in range(1, 8)]  # step k+1 is 0-based k
    assert [r["staleness"] for r in records] == [0] + [1] * 7
    assert [r["eps"] for r in records[:5]] == pytest.approx([0.2, 0.15, 0.1, 0.05, 0.0])  # the trained step's ε
    assert all(r["learner_idle_s"] >= 0 and r["producer_idle_s"] >= 0 for r in records)
    assert summary["final_probe_kl"] < summary["initial_probe_kl"], summary


def test_staleness_one_resume_continues_exactly(task_models, task_teacher, tmp_path, monkeypatch) -> None:
    """A crash after the checkpoint at step 2 (which holds batch 2, sampled by version 1), then --resume:
    the same losses as an uninterrupted run. Resampling batch 2 with version 2 would change them.
    (The in-flight batches are the pipeline's, whichever producer sampled them: the process producer's
    resume is the kill -9 test's, and its tokens equal the thread producer's: test_producer_process.py.)"""
    common = ("train.steps=4", "train.max_staleness=1")
    train.train_sync(_cfg(task_models, task_teacher.url, tmp_path / "a", *common))
    learn = train.learn

    def crash_at_step_2(run, rollouts, started=None):
        if run.step == 2:
            raise Killed("killed")
        return learn(run, rollouts, started)

    monkeypatch.setattr(train, "learn", crash_at_step_2)
    with pytest.raises(Killed):
        train.train_sync(_cfg(task_models, task_teacher.url, tmp_path / "b", *common))
    state = checkpoint.load_state(checkpoint.latest(tmp_path / "b" / "checkpoints"))
    assert state["step"] == 2 and [b.version for b in state["in_flight"][0].values()] == [1]
    monkeypatch.setattr(train, "learn", learn)
    train.train_sync(_cfg(task_models, task_teacher.url, tmp_path / "b", *common), resume=True)
    a, b = _steps(tmp_path / "a"), _steps(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["policy_version"] for r in b] == [0, 0, 1, 2]
    for ra, rb in zip(a, b, strict=True):
        assert ra["tokens"] == rb["tokens"]
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-6)


def test_a_dead_producer_stops_the_run_and_keeps_the_checkpoint(task_models, task_teacher, tmp_path,
                                                                monkeypatch) -> None:
    rollout_batch = train.rollout_batch

    async def dies_at_step_3(run, step, policy):
        if step == 3:
            raise RuntimeError("decoder crashed")
        return await rollout_batch(run, step, policy)

    monkeypatch.setattr(train, "rollout_batch", dies_at_step_3)
    with pytest.raises(PipelineError, match="decoder crashed"):
        train.train_sync(_cfg(task_models, task_teacher.url, tmp_path, "train.steps=5", "train.max_staleness=1"))
    latest = checkpoint.latest(tmp_path / "checkpoints")
    assert latest is not None and checkpoint.load_state(latest)["step"] == 2


def _children(pid: int) -> set[int]:
    """The live child processes of `pid` (Linux /proc)."""
    found = set()
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        found |= {int(c) for c in children.read_text().split()}
    return found


@pytest.mark.slow
@pytest.mark.parametrize("producer", ["thread", "process"])
def test_kill_9_a_staleness_one_run_then_resume(task_models, task_teacher, tmp_path, producer) -> None:
    """kill -9 the CLI somewhere after its first step, then --resume: the run ends at its last step with
    every batch sampled by exactly its version (the in-flight batch came back from the checkpoint).
    A producer process (and anything else the CLI started) exits by itself."""
    steps, out = 8, tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({
        "student": {"path": str(task_models[1])}, "teacher": {"url": task_teacher.url, "top_k": 8},
        "method": {"name": "trb", "eps0": 0.3, "horizon": steps}, "data": {"eval_size": 4, "probe_size": 4},
        "train": {"steps": steps, "batch_size": 4, "max_new_tokens": 12, "eval_every": 0, "save_every": 1,
                  "out_dir": str(out), "progress": False, "threads": 1, "max_staleness": 1,
                  "producer": producer}}))
    cli = [sys.executable, "-m", "student_trainer.cli", "--config", str(cfg)]
    proc = subprocess.Popen(cli, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 120
    while not (metrics.exists() and _steps(out)) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.5)  # somewhere in a later step: rollout, update or a save
    assert proc.poll() is None, "the run ended before the kill; lengthen it"
    children = _children(proc.pid)
    assert len(children) >= (producer == "process")
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{c}").exists() for c in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(Path(f"/proc/{c}").exists() for c in children), "a process outlived the killed trainer"
    killed_after = len(_steps(out))
    resumed = subprocess.run(cli + (["--resume"] if checkpoint.latest(out / "checkpoints") else []), cwd=REPO,
                             capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    records = _steps(out)
    assert [r["step"] for r in records] == list(range(1, steps + 1)), f"killed after {killed_after} steps"
    assert [r["policy_version"] for r in records] == [0] + list(range(steps - 1))
    assert checkpoint.load_state(checkpoint.latest(out / "checkpoints"))["step"] == steps


@pytest.mark.slow
@pytest.mark.parametrize("producer", ["thread", "process"])
def test_two_ranks_at_staleness_one_follow_one_process_and_resume(task_models, task_teacher, tmp_path,
                                                                  producer) -> None:
    """Each rank runs its own producer over its rows: the one-process curve; the checkpoint holds each
    rank's batch in flight, so two ranks resumed at step 2 continue it (resumed with the thread
    producer only: the in-flight batches are the pipeline's, whichever producer sampled them)."""
    common = ("train.steps=4", "train.max_staleness=1", "train.threads=1", f"train.producer={producer}")
    train.train_sync(_cfg(task_models, task_teacher.url, tmp_path / "one", *common))
    cfg = _cfg(task_models, task_teacher.url, tmp_path / "ddp", *common).public()
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "student_trainer.cli", "--config", str(tmp_path / "ddp.yaml")]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}
    for extra in ([], ["--resume"]) if producer == "thread" else ([],):
        proc = subprocess.run(cmd + extra, cwd=REPO, capture_output=True, text=True, timeout=240, env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        if not extra:  # rewind to the checkpoint at step 2, as if stopped there
            state = checkpoint.load_state(tmp_path / "ddp" / "checkpoints" / "step_000002")
            assert [sorted(b) for b in state["in_flight"]] == [[2], [2]]  # one dict per rank
            (tmp_path / "ddp" / "checkpoints" / "latest").write_text("step_000002\n")
        one, ddp = _steps(tmp_path / "one"), _steps(tmp_path / "ddp")
        assert [r["policy_version"] for r in ddp] == [0, 0, 1, 2]
        for a, b in zip(one, ddp, strict=True):
            assert a["tokens"] == b["tokens"]
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
