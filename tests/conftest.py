"""Fixtures: a tiny random teacher saved to disk, and a real `trb-teacher serve` process on 127.0.0.1."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import settings

from student_trainer.tasks.base_model import ModelShape, build_model
from student_trainer.tasks.tokenizer import build_tokenizer
from student_trainer.teacher.local import LocalTeacher, free_port  # noqa: F401  (tests import free_port)

sys.path.insert(0, str(Path(__file__).parent))
from tiny_model import make_tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# Hypothesis fails an example that takes over 200 ms (its default deadline): on a loaded machine that is
# a timing, not a wrong answer. No property test here has one (most said so already with deadline=None).
settings.register_profile("suite", deadline=None)
settings.load_profile("suite")

# Float32 results of one model computed two ways (another decoder, batch layout, kernel or split of the
# work between threads) differ by rounding, and rounding is relative: it grows with the magnitude of the
# values summed, which for logits and logprobs is their own scale. A fixed absolute bound passes on one
# CPU and fails on the next (1.049e-5 against 1e-5 for logits up to 16.6: ~5 float32 roundings). So
# comparisons of model outputs allow the larger of their absolute bound (what holds near 0) and
# F32_ULPS roundings of the compared values' largest magnitude. Why 16: the differences measured are up
# to ~6 roundings of the scale (arith-teacher, static or Qwen3 decoder against KVDecoder, 1 or 2 threads,
# AVX2 and AVX-512 machines), the worst case of a 128-term float32 dot product is 128, and a real error
# (a wrong mask, position or cache entry) moves logits by 1e-2 or more.
F32_EPS = float(torch.finfo(torch.float32).eps)  # 2**-23: one rounding of a float32, relative
F32_ULPS = 16


def f32_tol(scale: float, atol: float = 1e-5) -> float:
    """The largest difference float32 rounding explains between two computations of values up to
    `scale`: `atol`, or F32_ULPS roundings at that scale where this is more."""
    return max(atol, F32_ULPS * F32_EPS * float(scale))


def f32_diff(got: object, want: object, atol: float = 1e-5) -> tuple[float, float]:
    """(max |got - want|, f32_tol at want's largest magnitude): assert diff <= tol."""
    got_a, want_a = (np.asarray(x.detach() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
                     for x in (got, want))
    return float(np.abs(got_a - want_a).max(initial=0.0)), f32_tol(np.abs(want_a).max(initial=0.0), atol)


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Until `condition()` holds, polling every 0.1 s; fails naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f}s waiting for {what}"
        time.sleep(0.1)


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # `make test` runs two pytest workers on the machine's cores, and the servers and trainers the
        # tests start run one torch thread each: one here too, and in every process started from here,
        # not two per process spinning against the others' (nothing compared depends on it: f32_tol).
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


class ServerProcess(LocalTeacher):
    """A real `trb-teacher serve` on 127.0.0.1 with one torch thread (tests share 2 cores)."""

    def __init__(self, model: Path, *extra: str, log: Path | None = None, port: int | None = None) -> None:
        super().__init__(str(model), *extra, port=port, threads=1, log=log)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-teacher"))


@pytest.fixture(scope="session")
def teacher(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One real server process shared by the HTTP tests (full logprobs enabled)."""
    log = tmp_path_factory.mktemp("logs") / "teacher.log"
    server = ServerProcess(tiny_model, "--allow-full", "--max-full-values", "100000", log=log).wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def task_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A random tiny teacher and a smaller random student sharing the task tokenizer."""
    tok, root = build_tokenizer(), tmp_path_factory.mktemp("task-models")
    paths = []
    for name, shape, seed in [("teacher", ModelShape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128), 0),
                              ("student", ModelShape(hidden=32, layers=1, heads=2, kv_heads=2, intermediate=64), 1)]:
        model = build_model(tok, shape, seed)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths.append(root / name)
    return paths[0], paths[1]


@pytest.fixture(scope="session")
def task_teacher(task_models: tuple[Path, Path]) -> Iterator[ServerProcess]:
    server = ServerProcess(task_models[0], "--allow-full").wait_ready()
    yield server
    server.stop()
