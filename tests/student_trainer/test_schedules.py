"""Budget schedules: values at the ends, the middle, and past the horizon."""

import math

import pytest

from student_trainer.methods.schedules import budget, constant, cosine, linear, zero


def test_linear():
    assert linear(0, 0.2, 100) == 0.2
    assert linear(25, 0.2, 100) == pytest.approx(0.15)
    assert linear(99, 0.2, 100) == pytest.approx(0.002)
    assert linear(100, 0.2, 100) == 0.0 and linear(1000, 0.2, 100) == 0.0


def test_cosine():
    assert cosine(0, 0.2, 100) == pytest.approx(0.2)
    assert cosine(50, 0.2, 100) == pytest.approx(0.1)
    assert cosine(25, 0.2, 100) == pytest.approx(0.1 * (1 + math.cos(math.pi / 4)))
    assert cosine(100, 0.2, 100) == 0.0 and cosine(500, 0.2, 100) == 0.0


def test_constant_and_zero():
    assert [constant(k, 0.05, 10) for k in (0, 9, 10, 10_000)] == [0.05] * 4
    assert [zero(k, 0.05, 10) for k in (0, 9, 10)] == [0.0] * 3


def test_zero_horizon_means_no_warmup():
    assert linear(0, 0.2, 0) == 0.0 and cosine(0, 0.2, 0) == 0.0


def test_linear_and_cosine_are_nonincreasing():
    for name in ("linear", "cosine"):
        values = [budget(name, k, 0.1, 37) for k in range(50)]
        assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_dispatcher():
    assert budget("linear", 50, 0.2, 100) == linear(50, 0.2, 100)
    assert budget("zero", 0, 0.2, 100) == 0.0
    with pytest.raises(ValueError, match="'lineer'.*linear, cosine, constant, zero"):
        budget("lineer", 0, 0.2, 100)
