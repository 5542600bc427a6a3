"""The trainer under torchrun (gloo, 2 CPU processes) against a real teacher server process.

Same global batch and seed, so the same loss curve as one process; a checkpoint written by 2 ranks
resumes on 1 process (DDP) and on 2 ranks under FSDP2, continuing that curve.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from conftest import REPO
from student_trainer.config import load_config
from student_trainer.reports.metrics_file import read_metrics
from student_trainer.training import checkpoint
from student_trainer.training.loop import TrainingError, train_sync

STEPS, TOL = 4, 1e-4


def _cfg(path: Path, task_models: tuple[Path, Path], url: str, out: Path, **train: object) -> Path:
    cfg = {"student": {"path": str(task_models[1])}, "teacher": {"url": url, "top_k": 8},
           "method": {"name": "trb", "eps0": 0.3, "horizon": STEPS}, "optim": {"lr": 0.01},
           "data": {"eval_size": 4, "probe_size": 4},
           "train": {"steps": STEPS, "batch_size": 4, "max_new_tokens": 10, "eval_every": 0, "save_every": 2,
                     "keep_checkpoints": 2, "out_dir": str(out), "progress": False, "threads": 1, **train}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def _torchrun(cfg: Path, *extra: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "student_trainer.cli", "--config", str(cfg), *extra]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _losses(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(out / "metrics.jsonl") if "loss" in r}


def _rewind(src: Path, dst: Path, step: int) -> Path:
    """A copy of run `src` whose latest checkpoint is `step` (as if it had been stopped there)."""
    shutil.copytree(src, dst)
    (dst / "checkpoints" / "latest").write_text(f"step_{step:06d}\n")
    return dst


@pytest.mark.slow
def test_two_ranks_follow_the_one_process_curve_and_resume_anywhere(task_models, task_teacher, tmp_path) -> None:
    one = tmp_path / "one"
    train_sync(load_config(_cfg(tmp_path / "one.yaml", task_models, task_teacher.url, one)))
    ref = _losses(one)

    ddp = tmp_path / "ddp"
    _torchrun(_cfg(tmp_path / "ddp.yaml", task_models, task_teacher.url, ddp))
    got = _losses(ddp)
    deltas = [abs(got[s]["loss"] - ref[s]["loss"]) for s in range(1, STEPS + 1)]
    print(f"max |loss(2 ranks) - loss(1 process)| = {max(deltas):.2e} over {STEPS} steps")
    for s in range(1, STEPS + 1):
        assert got[s]["tokens"] == ref[s]["tokens"] and got[s]["eps"] == ref[s]["eps"]
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], abs=TOL)
        assert got[s]["beta_mean"] == pytest.approx(ref[s]["beta_mean"], abs=TOL)
    assert (ddp / "checkpoints" / "step_000004").is_dir()

    # the 2-rank checkpoint at step 2, resumed by one process
    resumed = _rewind(ddp, tmp_path / "resumed", 2)
    train_sync(load_config(_cfg(tmp_path / "resumed.yaml", task_models, task_teacher.url, resumed)), resume=True)
    got = _losses(resumed)
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in (3, 4):
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], abs=TOL)

    # the same checkpoint resumed by 2 ranks under FSDP2: its optimizer state round-trips through the shards
    fsdp = _rewind(ddp, tmp_path / "fsdp", 2)
    _torchrun(_cfg(tmp_path / "fsdp.yaml", task_models, task_teacher.url, fsdp, parallel="fsdp"), "--resume")
    got = _losses(fsdp)
    for s in (3, 4):
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], abs=TOL)
    a = checkpoint.load_state(checkpoint.latest(one / "checkpoints"))["optimizer"]
    b = checkpoint.load_state(checkpoint.latest(fsdp / "checkpoints"))["optimizer"]
    assert a["param_groups"][0]["params"] == b["param_groups"][0]["params"]
    for i, state in a["state"].items():
        assert torch.allclose(state["exp_avg"], b["state"][i]["exp_avg"], atol=1e-5)


def test_micro_batches_follow_the_same_curve(task_models, task_teacher, tmp_path) -> None:
    """accum_steps only trades memory for time: the loss is the global token-mean either way."""
    curves = []
    for accum in (1, 2):
        out = tmp_path / f"accum{accum}"
        cfg = _cfg(tmp_path / f"accum{accum}.yaml", task_models, task_teacher.url, out, steps=2, save_every=0)
        train_sync(load_config(cfg, [f"optim.accum_steps={accum}"]))
        curves.append(_losses(out))
    for s in (1, 2):
        assert curves[1][s]["loss"] == pytest.approx(curves[0][s]["loss"], abs=TOL)


def test_a_global_batch_that_does_not_split_fails_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """batch_size is the global batch: it must divide by world size x accum_steps, checked before any work."""
    import student_trainer.training.distributed as distributed

    cfg = load_config(None, ["student.path=/nonexistent", "teacher.url=http://127.0.0.1:1", "train.batch_size=6",
                             "optim.accum_steps=2", f"train.out_dir={tmp_path / 'run'}"])
    monkeypatch.setattr(distributed, "init", lambda device: distributed.Dist(rank=1, world=2))
    with pytest.raises(TrainingError, match=r"train\.batch_size=6 .* world size x optim\.accum_steps = 2 x 2"):
        train_sync(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_fsdp_bf16_mixed_follows_one_process_and_saves_float32(task_models, task_teacher, tmp_path) -> None:
    """FSDP2 with MixedPrecisionPolicy(bf16, reduce fp32) and a chunked loss (recomputed in the backward,
    lm_head owned by the root module) against one bf16-mixed process; checkpoints hold float32 masters."""
    extra = dict(steps=2, save_every=2, precision="bf16-mixed", loss_chunk_tokens=3)
    one, fsdp = tmp_path / "one", tmp_path / "fsdp"
    train_sync(load_config(_cfg(tmp_path / "one.yaml", task_models, task_teacher.url, one, **extra)))
    _torchrun(_cfg(tmp_path / "fsdp.yaml", task_models, task_teacher.url, fsdp, parallel="fsdp", **extra))
    ref, got = _losses(one), _losses(fsdp)
    for s in (1, 2):
        assert got[s]["tokens"] == ref[s]["tokens"]
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], rel=0.02)  # bf16 rounding differs by path
    saved = AutoModelForCausalLM.from_pretrained(fsdp / "checkpoints" / "step_000002")
    assert all(p.dtype == torch.float32 for p in saved.parameters())
