"""The trainer never loses work: non-finite steps are skipped, kills leave an intact checkpoint,
and a teacher that dies mid-run is waited for and its sessions rebuilt."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import REPO, ServerProcess
from student_trainer.config import load_config
from student_trainer.data import TaskData
from student_trainer.reports.metrics_file import read_metrics
from student_trainer.teacher.client import TeacherClient
from student_trainer.training import checkpoint
from student_trainer.training.learner import train_step
from student_trainer.training.loop import _loop
from student_trainer.training.run import Run, TrainingError


def _write_cfg(path: Path, task_models: tuple[Path, Path], url: str, out: Path, steps: int, **train: object) -> Path:
    cfg = {"student": {"path": str(task_models[1])}, "teacher": {"url": url, "top_k": 8},
           "method": {"name": "trb", "eps0": 0.3, "horizon": steps},
           "data": {"eval_size": 4, "probe_size": 4},
           "train": {"steps": steps, "batch_size": 4, "max_new_tokens": 12, "eval_every": 0, "save_every": 1,
                     "out_dir": str(out), "progress": False, "threads": 1, **train}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def _trainer(cfg: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "student_trainer.cli", "--config", str(cfg), *extra], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _steps_logged(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    return [r["step"] for r in read_metrics(path) if "loss" in r] if path.exists() else []


async def _nan_run(task_models, url: str, out: Path) -> tuple[dict, Exception | None]:
    cfg = load_config(None, [f"student.path={task_models[1]}", f"teacher.url={url}", "teacher.top_k=8",
                             "train.batch_size=2", "train.max_new_tokens=6", "train.steps=5", "train.max_bad_steps=2",
                             f"train.out_dir={out}", "train.progress=false", "data.eval_size=2", "data.probe_size=2"])
    student = AutoModelForCausalLM.from_pretrained(task_models[1])
    tok = AutoTokenizer.from_pretrained(task_models[1])
    async with TeacherClient(url) as client:
        opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
        run = Run(cfg, out, student, tok, client, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                  TaskData(cfg.data))
        before = [p.detach().clone() for p in student.parameters()]
        with torch.no_grad():  # poison the output layer: the loss is NaN, the update must not land
            student.get_output_embeddings().weight[5, 0] = float("nan")
        record = await train_step(run)
        after = list(student.parameters())
        unchanged = all(torch.equal(a, b) | torch.isnan(b).any() for a, b in zip(before, after, strict=True))
        assert unchanged
        out.mkdir(parents=True, exist_ok=True)
        try:
            await _loop(run)
            return record, None
        except TrainingError as exc:
            return record, exc


def test_non_finite_steps_are_skipped_then_stop_the_run(task_models, task_teacher, tmp_path) -> None:
    record, error = asyncio.run(_nan_run(task_models, task_teacher.url, tmp_path / "nan"))
    assert record["skipped"] is True
    assert error is not None and "consecutive non-finite steps" in str(error)


def _step_seconds(out: Path) -> float:
    """The last logged step's time (rollout and update; its checkpoint is saved after it is logged)."""
    return [r["step_s"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r][-1]


@pytest.mark.slow
def test_kill_trainer_at_random_moments_then_resume(task_models, task_teacher, tmp_path) -> None:
    rng, steps, killed_at = random.Random(7), 8, []
    for trial in range(3):  # three kill points a run (more add ~16 s each; test_pipeline kills at staleness 1 too)
        out = tmp_path / f"trial{trial}"
        cfg = _write_cfg(tmp_path / f"t{trial}.yaml", task_models, task_teacher.url, out, steps)
        proc = _trainer(cfg)
        after = rng.randint(1, steps - 3)  # steps logged before the kill, then anywhere in the next one
        deadline = time.monotonic() + 240
        while len(_steps_logged(out)) < after:
            assert proc.poll() is None, "the run ended before the kill"
            assert time.monotonic() < deadline, "no step logged in time"
            time.sleep(0.02)
        # anywhere in the save of that step or in the next step (rollout, update, its save), in units of
        # this machine's own step time, quiet or loaded; >= 1.5 steps are left to run
        time.sleep(rng.uniform(0.0, 1.5) * _step_seconds(out))
        assert proc.poll() is None, "the run ended before the kill; lengthen it"
        proc.kill()
        proc.wait()
        killed_at.append(len(_steps_logged(out)))
        resumed = _trainer(cfg, "--resume") if checkpoint.latest(out / "checkpoints") else _trainer(cfg)
        log, _ = resumed.communicate(timeout=240)
        assert resumed.returncode == 0, log
        latest = checkpoint.latest(out / "checkpoints")
        assert latest is not None and checkpoint.load_state(latest)["step"] == steps
        AutoModelForCausalLM.from_pretrained(latest)
        assert not list((out / "checkpoints").glob(".tmp_*"))
        assert _steps_logged(out)[-1] == steps
    print(f"killed after steps {killed_at}")  # the spread of kill points, for the record


@pytest.mark.slow
def test_teacher_killed_mid_run_is_survived(task_models, tmp_path) -> None:
    teacher = ServerProcess(task_models[0]).wait_ready()
    out, steps = tmp_path / "run", 8
    cfg = _write_cfg(tmp_path / "cfg.yaml", task_models, teacher.url, out, steps)
    proc = _trainer(cfg)
    try:
        deadline = time.monotonic() + 120
        while len(_steps_logged(out)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        teacher.proc.kill()  # kill -9 in the middle of a rollout
        teacher.proc.wait()
        time.sleep(1.0)
        teacher = ServerProcess(task_models[0], port=teacher.port).wait_ready()
        log, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, log
        assert _steps_logged(out) == list(range(1, steps + 1))
        rebuilds = sum(r.get("session_rebuilds", 0) for r in read_metrics(out / "metrics.jsonl"))
        print(f"teacher killed after step 2; session rebuilds: {rebuilds}")
    finally:
        proc.kill()
        teacher.stop()
