"""The trainer's first minute, run as a user runs it (`trb-train` as a subprocess): each common mistake
ends in one line naming the key at fault, a wait says what it waits for, and `--check` trains nothing."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import REPO, free_port, wait_for


def _train(*sets: str, check: bool = False, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "student_trainer.cli", "--config", "recipes/arithmetic/trb.yaml"]
    args += [x for s in sets for x in ("--set", s)] + (["--check"] if check else [])
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TRB_API_KEY": "", **(env or {})})


def _tiny(task_models: tuple[Path, Path], url: str, out: Path) -> list[str]:
    return [f"student.path={task_models[1]}", f"teacher.url={url}", "teacher.top_k=8", "train.steps=3",
            "train.batch_size=4", "train.max_new_tokens=12", "data.eval_size=4", "data.probe_size=4",
            f"train.out_dir={out}", "train.progress=false", "train.threads=1"]


class _Stub(BaseHTTPRequestHandler):
    """A server that answers every request with one fixed error, as the teacher server words it."""

    status, code, message = 503, "not_ready", "the model process is down and being restarted"

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = json.dumps({"error": {"code": self.code, "message": self.message}}).encode()
        self.send_response(self.status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def stub() -> Iterator[callable]:
    servers = []

    def start(status: int, code: str, message: str) -> str:
        handler = type("Handler", (_Stub,), {"status": status, "code": code, "message": message})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(("key", "sets"), [
    ("student.path", ["student.path=models/nope"]),
    ("teacher.model", ["teacher.model=models/nope"]),
])
def test_a_missing_model_folder_is_named_at_once(key: str, sets: list[str], tmp_path: Path) -> None:
    proc = _train(*sets, f"train.out_dir={tmp_path / 'run'}")
    assert proc.returncode != 0
    assert f"trb-train: {key}: no folder 'models/nope'" in proc.stderr
    assert "taken as a local folder" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_hub_id_offline_is_named_as_a_hub_id(tmp_path: Path) -> None:
    proc = _train("student.path=no-such-org/no-such-model", f"train.out_dir={tmp_path}",
                  env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0
    assert "student.path: 'no-such-org/no-such-model' is not a local folder, so it was taken as a hub id" \
        in proc.stderr


def test_a_teacher_not_up_is_reported_while_waiting(stub, tmp_path: Path) -> None:
    """Two replicas, one on a closed port and one answering 503: each says why it is not ready."""
    closed, loading = f"http://127.0.0.1:{free_port()}", stub(503, "not_ready", "the model is loading")
    proc = _train(f"teacher.url=[{closed}, {loading}]", "teacher.ready_timeout_s=4", f"train.out_dir={tmp_path}")
    assert proc.returncode != 0
    waiting = [line for line in proc.stderr.splitlines() if line.startswith("trb-train: waiting for the teacher")]
    assert any(f"at {closed}: connection refused" in line for line in waiting), proc.stderr
    assert any(f"at {loading}: 503, the server is up but its model is not loaded" in line for line in waiting)
    assert "not ready after 4s" in proc.stderr and "teacher.ready_timeout_s" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_refused_api_key_fails_without_waiting(stub, tmp_path: Path) -> None:
    url = stub(401, "unauthorized", "a valid API key is required (Authorization: Bearer <key>)")
    # A wait would outlast the subprocess timeout (120 s): the 401 must end the run at once.
    proc = _train("teacher.url=" + url, "teacher.ready_timeout_s=600", "teacher.api_key=wrong-key-1234",
                  f"train.out_dir={tmp_path}")
    assert proc.returncode != 0
    assert f"trb-train: teacher at {url} refused the API key (401" in proc.stderr
    assert "teacher.api_key or $TRB_API_KEY" in proc.stderr and "waiting for" not in proc.stderr


def test_a_tokenizer_mismatch_fails_at_once(tiny_model, task_teacher, tmp_path: Path) -> None:
    proc = _train(f"student.path={tiny_model}", f"teacher.url={task_teacher.url}", f"train.out_dir={tmp_path}")
    assert proc.returncode != 0
    assert "trb-train: tokenizer mismatch: the student's tokenizer fingerprint" in proc.stderr


def test_check_prints_the_plan_and_writes_nothing(task_models, task_teacher, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _train(*_tiny(task_models, task_teacher.url, out), check=True)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "trb-train --check: ready to train; nothing was trained or written."
    plan = {line.split()[0]: line for line in lines[1:]}
    assert set(plan) == {"student", "teacher", "method", "data", "run", "eval", "checkpoints", "trackers"}
    assert "= the student's" in plan["teacher"] and task_teacher.url in plan["teacher"]
    assert plan["trackers"].split(None, 1)[1] in ("tensorboard", "none (metrics.jsonl only)")  # the default
    assert "3 steps x 4 rollouts = 12 rollouts of up to 12 new tokens" in plan["run"]
    assert f"{out / 'checkpoints'}/step_NNNNNN" in plan["checkpoints"]
    assert not out.exists()


def test_check_refuses_a_top_k_over_the_teachers_limit(task_models, task_teacher, tmp_path: Path) -> None:
    proc = _train(*_tiny(task_models, task_teacher.url, tmp_path / "run"), "teacher.top_k=100000", check=True)
    assert proc.returncode != 0
    assert "trb-train: teacher.top_k=100000 exceeds the teacher's max_top_k" in proc.stderr


def test_a_run_prints_no_transformers_progress_bars(task_models, task_teacher, tmp_path: Path) -> None:
    """transformers' `Loading weights` / `Writing model shards` bars would repeat between our progress
    bar and the summary at every eval and checkpoint."""
    proc = _train(*_tiny(task_models, task_teacher.url, tmp_path / "run"), "train.save_every=1")
    assert proc.returncode == 0, proc.stderr
    assert "run summary" in proc.stdout + proc.stderr
    assert (tmp_path / "run" / "checkpoints").exists()
    for bar in ("Loading weights", "Writing model shards"):
        assert bar not in proc.stdout + proc.stderr


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2:].split()[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def test_sigterm_ends_the_run_and_its_local_teacher(task_models, tmp_path: Path) -> None:
    """`kill` on a run that started its own teacher: the run stops as on Ctrl-C and the teacher with it;
    under Python's default SIGTERM the trainer vanished without unwinding and left its teacher running."""
    teacher, student = task_models
    args = [sys.executable, "-m", "student_trainer.cli", "--config", "recipes/arithmetic/trb.yaml"]
    sets = [*_tiny(task_models, "null", tmp_path / "run"), f"teacher.model={teacher}", "train.steps=100000",
            "train.eval_every=0", "train.save_every=0"]
    proc = subprocess.Popen(args + [x for s in sets for x in ("--set", s)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "TRB_API_KEY": ""})
    metrics, teachers = tmp_path / "run" / "metrics.jsonl", []
    try:
        wait_for(lambda: metrics.exists() and '"loss"' in metrics.read_text(), 120, "the first step")
        teachers = [p for p in _children(proc.pid) if b"teacher_server.cli" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(teachers) == 1
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 1 and "interrupted; the last checkpoint is intact" in err, err
        wait_for(lambda: not Path(f"/proc/{teachers[0]}").exists(), 60, "the local teacher to exit")
    finally:
        proc.kill()
        for pid in teachers:  # an orphan of a failed run must not outlive the test
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
