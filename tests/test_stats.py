"""The statistics of `make reproduce` against hand computations."""

import math
import statistics

import pytest

from student_trainer.reports.stats import area_under_curve, early_quality, mean_ci95, paired_bootstrap_ci95, t975


def test_mean_ci95_is_the_t_interval() -> None:
    xs = [0.1, 0.2, 0.3, 0.4, 0.5]
    mean, half = mean_ci95(xs)
    assert mean == pytest.approx(0.3)
    assert half == pytest.approx(2.776 * statistics.stdev(xs) / math.sqrt(5))
    assert t975(100) == 1.96
    with pytest.raises(ValueError):
        mean_ci95([1.0])


def test_paired_bootstrap_keeps_pairs_together() -> None:
    """Large per-method spread but a constant per-seed difference: the paired interval is a point."""
    a = [0.1, 0.5, 0.9, 0.3, 0.7]
    b = [x - 0.05 for x in a]
    mean, lo, hi = paired_bootstrap_ci95(a, b)
    assert mean == pytest.approx(0.05) and lo == pytest.approx(0.05) and hi == pytest.approx(0.05)


def test_paired_bootstrap_interval_brackets_the_mean_and_lies_within_the_range() -> None:
    a, b = [0.3, 0.1, 0.4, 0.2, 0.6], [0.2, 0.2, 0.1, 0.2, 0.3]
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean, lo, hi = paired_bootstrap_ci95(a, b)
    assert mean == pytest.approx(statistics.fmean(diffs))
    assert min(diffs) <= lo <= mean <= hi <= max(diffs)
    assert lo < hi
    assert paired_bootstrap_ci95(a, b) == (mean, lo, hi)  # seeded: the same answer every time


def test_area_under_curve() -> None:
    assert area_under_curve([0, 10, 20], [0.0, 1.0, 1.0]) == pytest.approx(0.75)


def test_early_quality_averages_the_first_steps_only() -> None:
    records = [{"step": 0, "eval_accuracy": 0.1},
               {"step": 1, "loss": 1.0, "teacher_loglik": -2.0, "beta_one": 0.2, "kl_mu_student": 0.1},
               {"step": 2, "loss": 1.0, "teacher_loglik": -1.0, "beta_one": 0.4, "kl_mu_student": 0.05},
               {"step": 3, "loss": 1.0, "teacher_loglik": -9.0, "beta_one": 0.9, "kl_mu_student": 0.0}]
    out = early_quality(records, first_steps=2)
    assert out == pytest.approx({"teacher_loglik": -1.5, "beta_one": 0.3, "kl_mu_student": 0.075})
    assert "beta_mean" not in out
