"""train.producer=process: the same run as the thread producer, loud when it dies, nothing left behind;
student.rollout_device: checked before any work."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import time

import pytest
import torch
from test_pipeline import _cfg, _steps
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import free_port
from student_trainer.config import ConfigError, load_config
from student_trainer.rollouts.pipeline import Pipeline, PipelineError, producer_copy, producer_device
from student_trainer.rollouts.producer_process import ProducerDied, ProducerProcess, ProducerSpec
from student_trainer.training import checkpoint
from student_trainer.training import loop as train
from student_trainer.training.distributed import Dist


def _producers() -> list[multiprocessing.Process]:
    return [p for p in multiprocessing.active_children() if p.name == "rollout-producer"]


def test_process_producer_samples_the_thread_producers_tokens(task_models, task_teacher, tmp_path) -> None:
    """Same (seed, step, row) streams, same weights at the same versions: the same tokens and losses."""
    common = ("train.steps=4", "train.max_staleness=1", "train.threads=1")
    train.train_sync(_cfg(task_models, task_teacher.url, tmp_path / "thread", *common, "student.rollout_device=cpu"))
    train.train_sync(_cfg(task_models, task_teacher.url, tmp_path / "process", *common, "train.producer=process"))
    assert _producers() == []  # joined at the end of the run
    thread, process = _steps(tmp_path / "thread"), _steps(tmp_path / "process")
    assert [r["policy_version"] for r in process] == [0, 0, 1, 2]
    for a, b in zip(thread, process, strict=True):
        assert (a["tokens"], a["response_len"]) == (b["tokens"], b["response_len"])
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["kl_mu_student"] == pytest.approx(b["kl_mu_student"], abs=1e-6)


@pytest.mark.slow
def test_the_process_producer_is_told_of_each_version_once(task_models, task_teacher, tmp_path) -> None:
    """At staleness 1 batches 0 and 1 are both version 0: four batches, three copies into the shared
    weights, and the process bumps its version counters (the Qwen3 step re-fuses) after three."""
    cfg = _cfg(task_models, task_teacher.url, tmp_path, "train.steps=4", "train.max_staleness=1", "train.threads=1")
    source = AutoModelForCausalLM.from_pretrained(task_models[1])
    policy = producer_copy(source, torch.device("cpu"), shared=True)
    spec = ProducerSpec(cfg, AutoTokenizer.from_pretrained(task_models[1]), {"default": [task_teacher.url]}, "trainer:test", 0, 1,
                        Dist().device)
    remote = ProducerProcess(spec, policy)
    written = policy.model.norm.weight._version  # one weight (not the tied embedding, written twice a copy)

    def learn(rollouts: list) -> dict:
        with torch.no_grad():
            for p in source.parameters():
                p.mul_(1.01)
        return {"tokens": sum(int(r.tokens_B_T.numel()) for r in rollouts)}

    async def run() -> list[dict]:
        pipe = Pipeline(remote.produce, source, 0, 4, 1, policy=policy, on_close=remote.close).start()
        try:
            return [await pipe.train(k, learn) for k in range(4)]
        finally:
            await pipe.close()

    records = asyncio.run(run())
    assert [r["policy_version"] for r in records] == [0, 0, 1, 2]
    assert policy.model.norm.weight._version - written == 3
    assert remote.refreshes == 3
    assert _producers() == []


def test_a_killed_producer_process_fails_the_run_promptly(task_models, task_teacher, tmp_path, monkeypatch) -> None:
    """kill -9 the producer process during the update after the checkpoint at step 2: PipelineError
    within seconds, the checkpoint intact, no process left."""
    learn, killed = train.learn, {}

    def kill_the_producer_at_step_2(run, rollouts, started=None):
        if run.step == 2:
            (producer,) = _producers()
            os.kill(producer.pid, signal.SIGKILL)
            killed.update(pid=producer.pid, at=time.monotonic())
        return learn(run, rollouts, started)

    monkeypatch.setattr(train, "learn", kill_the_producer_at_step_2)
    cfg = _cfg(task_models, task_teacher.url, tmp_path, "train.steps=6", "train.max_staleness=1",
               "train.threads=1", "train.producer=process")
    with pytest.raises(PipelineError, match="killed by SIGKILL"):
        train.train_sync(cfg)
    # at the learner's next wait, not a hang: within 20 s, or 3 of this machine's steps on a loaded one
    within = max(20.0, 3 * max(r["step_s"] for r in _steps(tmp_path)))
    assert time.monotonic() - killed["at"] < within
    assert _producers() == []
    with pytest.raises(ProcessLookupError):
        os.kill(killed["pid"], 0)
    latest = checkpoint.latest(tmp_path / "checkpoints")
    state = checkpoint.load_state(latest)
    assert state["step"] == 2 and [b.version for b in state["in_flight"][0].values()] == [1]
    assert [r["step"] for r in _steps(tmp_path)] == [1, 2, 3]  # the update under way when it died completes


def test_a_producer_that_fails_to_start_reports_why(task_models, tmp_path) -> None:
    """No teacher at its URL: the process sends its traceback, `produce` raises it, nothing is left."""
    url = f"http://127.0.0.1:{free_port()}"
    cfg = _cfg(task_models, url, tmp_path, "train.max_staleness=1", "teacher.ready_timeout_s=0.5")
    policy = producer_copy(AutoModelForCausalLM.from_pretrained(task_models[1]), torch.device("cpu"), shared=True)
    spec = ProducerSpec(cfg, AutoTokenizer.from_pretrained(task_models[1]), {"default": [url]}, "trainer:test", 0, 1,
                        Dist().device)
    remote = ProducerProcess(spec, policy)
    try:
        with pytest.raises(ProducerDied, match="(?s)failed:.*Traceback.*TeacherError"):
            asyncio.run(remote.produce(0, policy))
    finally:
        remote.close()
    assert remote.process.exitcode is not None and _producers() == []


def test_an_error_before_the_first_step_stops_the_producer_process(task_models, task_teacher, tmp_path,
                                                                   monkeypatch) -> None:
    async def evaluator_that_fails(run):
        def evaluate():
            raise RuntimeError("eval failed")
        return evaluate

    monkeypatch.setattr(train, "evaluator", evaluator_that_fails)
    with pytest.raises(RuntimeError, match="eval failed"):
        train.train_sync(_cfg(task_models, task_teacher.url, tmp_path, "train.steps=2", "train.max_staleness=1",
                              "train.producer=process"))
    assert _producers() == []


def test_a_missing_rollout_device_fails_before_loading(task_models, task_teacher, tmp_path) -> None:
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last (cuda:0 on a CPU machine)
    cfg = _cfg(task_models, task_teacher.url, tmp_path, "train.steps=2", "train.max_staleness=1",
               f"student.rollout_device={missing}")
    started = time.monotonic()
    with pytest.raises(ConfigError, match=f"student.rollout_device={missing}: this machine has"):
        train.train_sync(cfg)
    assert time.monotonic() - started < 5 and not (tmp_path / "metrics.jsonl").exists()


def test_rollout_device_and_producer_keys_are_checked() -> None:
    base = ["student.path=s", "teacher.url=http://x"]
    with pytest.raises(ConfigError, match="student.rollout_device: 'gpu:0' is not a device"):
        load_config(None, [*base, "train.max_staleness=1", "student.rollout_device=gpu:0"])
    with pytest.raises(ConfigError, match="train.producer: a producer process needs train.max_staleness >= 1"):
        load_config(None, [*base, "train.producer=process"])
    with pytest.raises(ConfigError, match="student.rollout_device: the producer's device needs"):
        load_config(None, [*base, "student.rollout_device=cpu"])
    cfg = load_config(None, [*base, "train.max_staleness=2", "train.producer=process", "student.rollout_device=cuda:1"])
    assert (cfg.train.producer, cfg.student.rollout_device) == ("process", "cuda:1")
    assert producer_device(None, torch.device("cpu")) == torch.device("cpu")
    assert producer_device("cpu", torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ConfigError, match="under torchrun each rank's producer"):
        producer_device("cpu", torch.device("cpu"), launched=True)
