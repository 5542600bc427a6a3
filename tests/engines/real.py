"""Real SGLang and real vLLM, each from its own venv, serving the shipped teacher (`make test-engines`).

The test modules here run only with TRB_REAL_ENGINES=1 (`REAL_ONLY`; the make target sets it after
building the venvs with scripts/engines/*.sh); `make test` skips them. Every engine runs float32 on 127.0.0.1 and is stopped,
child processes and all, when its module ends.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from conftest import REPO, ServerProcess, free_port

TEACHER = REPO / "models" / "arith-teacher"
STUDENT = REPO / "models" / "arith-student"
KEY = "engine-test-key-0123"


REAL_ONLY = pytest.mark.skipif(os.environ.get("TRB_REAL_ENGINES") != "1",
                               reason="real engines: run `make test-engines` (TRB_REAL_ENGINES=1)")


class Engine:
    """A real engine process started by a launcher module (`vllm_engine`, `sglang_engine`)."""

    def __init__(self, launcher: Any, log: Path, port: int | None = None, **kwargs: Any) -> None:
        if launcher.venv_python() is None:
            pytest.fail(f"{launcher.__name__}: the engine venv is missing; run the scripts in scripts/engines/")
        self.launcher, self.log, self.kwargs = launcher, log, kwargs
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = launcher.launch(str(TEACHER), self.port, log_path=log, **kwargs)
        self.started = time.monotonic()

    def wait_healthy(self, timeout_s: float = 600) -> Engine:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    self.ready_s = time.monotonic() - self.started
                    return self
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                pytest.fail(f"the engine exited with {self.proc.returncode}; see {self.log}:\n"
                            + self.log.read_text()[-3000:])
            if time.monotonic() > deadline:
                pytest.fail(f"the engine was not healthy after {timeout_s:.0f}s; see {self.log}")
            time.sleep(0.5)

    def kill(self) -> None:
        """SIGKILL the whole engine (every process of its session): a crash, not a shutdown."""
        self.launcher.stop(self.proc, timeout=0)

    def restart(self) -> Engine:
        return Engine(self.launcher, self.log, port=self.port, **self.kwargs)

    def stop(self) -> None:
        self.launcher.stop(self.proc)


@pytest.fixture(scope="session")
def hf_teacher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The reference: the shipped teacher on the hf backend, full logprobs allowed."""
    log = tmp_path_factory.mktemp("logs") / "hf_teacher.log"
    server = ServerProcess(TEACHER, "--allow-full", "--max-full-values", "1000000", log=log).wait_ready()
    yield server
    server.stop()


def teacher_on(backend: str, engine_url: str, log: Path, *extra: str, key: str | None = KEY) -> ServerProcess:
    """`trb-teacher serve --backend <backend>` in front of a real engine (its key in a file)."""
    args = ["--backend", backend, f"--{backend}-url", engine_url, "--allow-full", "--max-full-values", "1000000",
            *extra]
    if key:
        (key_file := log.with_suffix(".key")).write_text(key + "\n")
        args += [f"--{backend}-api-key-file", str(key_file)]
    return ServerProcess(TEACHER, *args, log=log)


def write_run(path: Path, url: str, out: Path, method: dict, steps: int = 10) -> Path:
    """A short run of the shipped student against `url`: checkpoints every step, no eval."""
    cfg = {"student": {"path": str(STUDENT)}, "teacher": {"url": url, "top_k": 20, "retry_for_s": 600},
           "method": method, "data": {"eval_size": 8, "probe_size": 8},
           "train": {"steps": steps, "batch_size": 8, "max_new_tokens": 48, "eval_every": 0, "save_every": 1,
                     "out_dir": str(out), "progress": False, "threads": 1, "seed": 0}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def trainer(cfg: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "student_trainer.cli", "--config", str(cfg), *extra], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def steps_logged(out: Path) -> list[dict]:
    from student_trainer.reports.metrics_file import read_metrics

    path = out / "metrics.jsonl"
    return [r for r in read_metrics(path) if "loss" in r] if path.exists() else []


