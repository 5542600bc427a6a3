"""Fixtures: a tiny random teacher saved to disk, and a real `trb-teacher serve` process on 127.0.0.1."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from student_trainer.local_teacher import LocalTeacher, free_port  # noqa: F401  (tests import free_port)
from student_trainer.tasks.sft import ModelShape, build_model
from student_trainer.tasks.tokenizer import build_tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from tiny_model import make_tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


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
