"""The soak of `bench/soak.py` for 30 seconds, a fault every 2 s on average (faults come one at a time, so
a hang waiting out the watchdog leaves room for a few): every answer checked, nothing unexpected. The hour-long
soak and its figures are in docs/performance.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_half_a_minute_of_faults_leaves_every_answer_exact(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    run = subprocess.run([sys.executable, str(REPO / "bench" / "soak.py"), "--minutes", "0.5", "--fault-every", "2",
                          "--trainers", "1", "--lights", "1", "--json", str(out)],
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["server_alive"] and report["mismatches"] == 0 and report["positions"] > 0
    assert report["unexpected"] == []
    assert sum(report["faults"].values()) > 0


def test_the_summary_survives_gaps_nan_and_empty_series(capsys: pytest.CaptureFixture[str]) -> None:
    """A worker between restarts has no RSS to read and a client may never get an answer: the summary
    shows the gap (null, "-") instead of losing the run's figures to a NaN."""
    from bench import soak

    assert soak.rss_mb(None) is None and soak.rss_mb(2**22 + 1) is None  # no such process
    assert soak.rss_mb(os.getpid()) > 0
    assert [soak.figure(x) for x in (None, float("nan"), float("inf"), 2.6)] == [None, None, None, 3]
    assert soak.latency_ms([]) == [None, None, 0] and soak.latency_ms([0.01, 0.02])[2] == 2
    report = {"minutes": 1, "server_alive": True, "answers": 0, "positions": 0, "mismatches": 0, "tie_swaps": 0,
              "max_abs_logprob_diff": float("nan"), "faults": {}, "unexpected": [], "errors": {},
              "latency_ms": {"light-0": soak.latency_ms([])},
              "rss_mb": [(soak.figure(t), soak.figure(s), soak.figure(w))
                         for t, s, w in [(0.0, 400.2, 350.7), (3.1, 401.0, None), (6.0, float("nan"), 351.0)]]}
    assert json.loads(json.dumps(report["rss_mb"], allow_nan=False)) == [[0, 400, 351], [3, 401, None], [6, None, 351]]
    soak.print_report(report)
    out = capsys.readouterr().out
    assert "3: 401, -" in out and "6: -, 351" in out and "light-0" in out
