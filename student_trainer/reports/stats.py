"""The statistics `make reproduce` and the sweep report: confidence intervals over seeds, paired
differences with a bootstrap interval, and the quality of the early rollouts.

Pure functions of lists of numbers and metric records (no files), so each can be checked against a
hand computation. Seeds are the unit of replication: every run of seed s of every method starts from
the same student and is evaluated on the same held-out problems, so differences between methods
are paired by seed.
"""

from __future__ import annotations

import math
import random
import statistics
from typing import Any

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (then the normal's 1.96): the
# interval for a mean of a handful of seeds must not pretend the seed std is known.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with `df` degrees of freedom."""
    if df < 1:
        raise ValueError("a confidence interval needs at least 2 values")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def mean_ci95(xs: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval over seeds."""
    mean = statistics.fmean(xs)
    return mean, t975(len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))


def paired_bootstrap_ci95(a: list[float], b: list[float], resamples: int = 10_000,
                          seed: int = 0) -> tuple[float, float, float]:
    """Mean of the per-seed differences a[s] - b[s] and a 95% percentile bootstrap interval for it.

    Seeds are resampled with replacement, keeping each seed's pair together. With 5 seeds the
    interval is coarse (there are only 126 distinct resamples), which is why the t-interval of each
    method is reported next to it.
    """
    if len(a) != len(b) or len(a) < 2:
        raise ValueError("paired differences need the same seeds, at least 2, on both sides")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(diffs, k=len(diffs))) for _ in range(resamples))
    return statistics.fmean(diffs), means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def area_under_curve(steps: list[int], acc: list[float]) -> float:
    """Mean accuracy over training: trapezoid area under the curve divided by the step span."""
    total = sum((steps[i + 1] - steps[i]) * (acc[i] + acc[i + 1]) / 2 for i in range(len(steps) - 1))
    return total / max(1, steps[-1] - steps[0])


EARLY_KEYS = ("teacher_loglik", "kl_mu_student", "beta_one", "beta_mean")


def early_quality(records: list[dict[str, Any]], first_steps: int) -> dict[str, float]:
    """Means over optimizer steps 1..first_steps of the behavior diagnostics of the rollouts.

    teacher_loglik: how likely the teacher finds the sampled tokens (the quality of the prefixes it
    supervises); kl_mu_student: the realised KL(mu || pi_S) of the behavior; beta_one: the share of
    positions where the teacher itself was inside the ball. A key a method does not log (SKD has no
    beta) is left out.
    """
    steps = [r for r in records if "loss" in r and 1 <= r.get("step", 0) <= first_steps]
    out = {}
    for key in EARLY_KEYS:
        values = [r[key] for r in steps if isinstance(r.get(key), (int, float)) and not math.isnan(r[key])]
        if values:
            out[key] = statistics.fmean(values)
    return out
