"""The soak of `bench/soak.py`, for 60 seconds: faults at random, every answer checked, nothing unexpected."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_a_minute_of_faults_leaves_every_answer_exact(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    run = subprocess.run([sys.executable, str(REPO / "bench" / "soak.py"), "--minutes", "1", "--fault-every", "4",
                          "--trainers", "1", "--lights", "1", "--json", str(out)],
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["server_alive"] and report["mismatches"] == 0 and report["positions"] > 0
    assert report["unexpected"] == []
    assert sum(report["faults"].values()) > 0
