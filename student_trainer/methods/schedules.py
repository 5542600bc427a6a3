"""Schedules by optimizer step k: TRB's trust-region budget ε_k (docs/method.md §3), and Veto's β.

TRB anneals ε to 0 over a warmup horizon K, after which rollouts are pure student and need no
per-token teacher call. `constant` is the fixed-ε baseline and `zero` is vanilla OPD.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal


def linear(step: int, eps0: float, horizon: int) -> float:
    """ε0·(1 − k/K) for k < K, then 0: the paper's TRB schedule."""
    return eps0 * (1.0 - step / horizon) if step < horizon else 0.0


def cosine(step: int, eps0: float, horizon: int) -> float:
    """0.5·ε0·(1 + cos(πk/K)) for k < K, then 0: spends longer near ε0 than `linear`."""
    return 0.5 * eps0 * (1.0 + math.cos(math.pi * step / horizon)) if step < horizon else 0.0


def constant(step: int, eps0: float, horizon: int) -> float:
    """ε0 forever: the fixed-ε blending baseline (never annealed)."""
    return eps0


def zero(step: int, eps0: float, horizon: int) -> float:
    """0 forever: vanilla on-policy distillation."""
    return 0.0


SCHEDULES: dict[str, Callable[[int, float, int], float]] = {
    "linear": linear,
    "cosine": cosine,
    "constant": constant,
    "zero": zero,
}


def budget(name: str, step: int, eps0: float, horizon: int) -> float:
    """ε at optimizer step `step` under the named schedule."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown budget schedule {name!r}; valid: {', '.join(SCHEDULES)}")
    return SCHEDULES[name](step, eps0, horizon)


def veto_beta(schedule: Literal["linear", "constant"], step: int, beta0: float, steps: int) -> float:
    """β at an optimizer step: β0·(1 − k/steps) (the authors' linear decay to 0), or β0 throughout."""
    if schedule == "constant":
        return beta0
    if schedule == "linear":
        return beta0 * max(0.0, 1.0 - step / steps) if steps > 0 else beta0
    raise ValueError(f"unknown veto schedule {schedule!r}; valid: linear, constant")
