"""scripts/reproduce.py's report from finished runs' metrics (no training: synthetic metrics files)."""

import json
import sys
from pathlib import Path

import pytest

from scripts.reproduce import parse_variant, write_results
from student_trainer.reports.plots import plot_comparison


def _run(root: Path, name: str, accs: list[float], loglik: float) -> Path:
    out = root / name
    out.mkdir()
    records = []
    for i, acc in enumerate(accs):
        step = 10 * i
        if step:
            records += [{"step": s, "loss": 1.0, "tokens": 100, "teacher_loglik": loglik, "kl_mu_student": 0.01,
                         "beta_one": 0.5, "beta_mean": 0.6} for s in range(step - 9, step + 1)]
        records.append({"step": step, "eval_accuracy": acc, "probe_kl": 1.0 - acc})
    records[-1]["final"] = True
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


def test_the_report_has_intervals_paired_differences_and_early_quality(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["reproduce.py"])
    runs = {"trb": [_run(tmp_path, f"trb-{s}", [0.1, 0.3, 0.4 + s / 100], -1.0) for s in range(3)],
            "opd": [_run(tmp_path, f"opd-{s}", [0.1, 0.2, 0.3 + s / 100], -3.0) for s in range(3)]}
    dest = tmp_path / "results.md"
    write_results(runs, "train:\n  steps: 20\n", 60.0, dest, ["train.steps=20"], first_steps=10, title="test")
    text = dest.read_text()
    assert "| trb | 0.410 [" in text and "| opd | 0.310 [" in text  # final accuracy, mean of 3 seeds
    assert "| trb | opd | +0.100 [+0.100, +0.100] |" in text  # TRB - OPD: the same every seed
    assert "3 of 3 |" in text
    assert "| trb | -1.000 | 0.010 | 0.500 | 0.600 |" in text
    assert text.index("| trb |") < text.index("| opd |")  # sorted by area
    assert plot_comparison(runs, tmp_path / "results.png").stat().st_size > 0


def test_variants_are_rows_of_their_own(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["reproduce.py", "--reuse"])
    label, overrides = parse_variant("trb_e1:method.name=trb,method.eps0=1.0")
    assert (label, overrides) == ("trb_e1", ["method.name=trb", "method.eps0=1.0"])
    with pytest.raises(SystemExit):
        parse_variant("trb_e1:method.eps0=1.0")  # which method?
    runs = {"trb": [_run(tmp_path, f"trb-{s}", [0.1, 0.3, 0.4], -1.0) for s in range(2)],
            "trb_e1": [_run(tmp_path, f"trb_e1-{s}", [0.1, 0.3, 0.5], -0.5) for s in range(2)],
            "opd": [_run(tmp_path, f"opd-{s}", [0.1, 0.2, 0.3], -3.0) for s in range(2)]}
    dest = tmp_path / "results.md"
    write_results(runs, "x: 1\n", 60.0, dest, [], first_steps={"trb": 10, "trb_e1": 20, "opd": 10}, title="t",
                  reused=True, variants={label: overrides})
    text = dest.read_text()
    assert "| trb_e1 | opd | +0.200 [+0.200, +0.200] |" in text and "| trb | opd | +0.100" in text
    assert "| trb | trb_e1 |" not in text  # TRB rows are not each other's baselines
    assert "- `trb_e1`: `method.name=trb method.eps0=1.0`" in text
    assert "it reused finished runs" in text


def test_compare_runs_pairs_by_seed(tmp_path: Path) -> None:
    from scripts.compare_runs import compare

    for s in range(2):
        _run(tmp_path, f"a-seed{s}", [0.1, 0.3, 0.4 + s / 10], -1.0)
        _run(tmp_path, f"b-seed{s}", [0.1, 0.2, 0.3 + s / 10], -2.0)
    row = compare(str(tmp_path / "a"), str(tmp_path / "b"), seeds=2)
    assert "| +0.100 [+0.100, +0.100] |" in row and row.endswith("| 2 of 2 |")
