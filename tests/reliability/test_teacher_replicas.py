"""A run over two teacher replicas survives one of them being killed (-9) mid-run, without a restart."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from conftest import REPO, ServerProcess
from student_trainer.reports.metrics_file import read_metrics


def _requests_served(url: str) -> int:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return int(sum(float(v) for v in re.findall(r"^trb_teacher_requests_total\{.*\} ([0-9.e+]+)$", text, re.M)))


@pytest.mark.slow
def test_one_replica_killed_mid_run_the_run_completes(task_models, tmp_path) -> None:
    a, b = ServerProcess(task_models[0]).wait_ready(), ServerProcess(task_models[0]).wait_ready()
    out, steps = tmp_path / "run", 8
    cfg = {"student": {"path": str(task_models[1])}, "teacher": {"url": [a.url, b.url], "top_k": 8},
           "method": {"name": "trb", "eps0": 0.3, "horizon": steps}, "data": {"eval_size": 4, "probe_size": 4},
           "train": {"steps": steps, "batch_size": 4, "max_new_tokens": 12, "eval_every": 0, "save_every": 4,
                     "out_dir": str(out), "progress": False, "threads": 1}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "student_trainer.cli", "--config", str(tmp_path / "cfg.yaml")],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len([r for r in read_metrics(metrics) if "loss" in r]
                                                   if metrics.exists() else []) < 2:
            time.sleep(0.05)
        served_a = _requests_served(a.url)
        assert served_a > 0 and _requests_served(b.url) > 0  # both replicas were in use
        a.proc.kill()  # kill -9 in the middle of a rollout; it stays dead
        a.proc.wait()
        log, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, log
        records = [r for r in read_metrics(metrics) if "loss" in r]
        assert [r["step"] for r in records] == list(range(1, steps + 1))
        rebuilds = sum(r["session_rebuilds"] for r in records)
        print(f"replica A killed after step 2 (it had served {served_a} requests); B served "
              f"{_requests_served(b.url)} in all; session rebuilds: {rebuilds}")
    finally:
        proc.kill()
        a.stop()
        b.stop()
