"""A shared teacher under faults: a hung forward, a request that kills the model, SIGTERM mid-forward.

The faults are caused through the test-only hooks of `tests/fault_hooks/` (nothing of them ships in the server).
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from pathlib import Path

import httpx
import pytest
from fault_hooks import fault_markers as faults

from conftest import ServerProcess
from shared.protocol import ErrorCode, ScoreRequest
from student_trainer.teacher.client import TeacherClient, TeacherError
from teacher_server.backends.factory import load_backend
from teacher_server.settings import ServerSettings
from teacher_server.worker import ProcessBackend, WorkerCrashed, WorkerHung

CRASH, HANG = list(faults.CRASH), list(faults.HANG)


@pytest.fixture()
def hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    env = dict(os.environ)
    faults.enable(env)
    for key in (faults.ENV, "PYTHONPATH"):  # inherited by the workers and servers started below
        monkeypatch.setenv(key, env[key])


def _metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def test_the_watchdog_kills_a_hung_forward_and_the_next_call_is_served(tiny_model: Path, hooks: None) -> None:
    backend = ProcessBackend(functools.partial(load_backend, ServerSettings(model=str(tiny_model), threads=1)),
                             deadline_s=1.0, deadline_per_token_s=0.0)
    try:
        old = backend.pid
        with pytest.raises(WorkerHung, match="for over 1.0 s"):
            backend.score([ScoreRequest(sequences=[HANG + [1, 2]])])
        assert backend.hung == backend.restarts == 1 and backend.pid != old
        assert not _alive(old)
        assert backend.score([ScoreRequest(sequences=[[1, 2, 3]])])[0][0].top_ids.shape == (3, 20)
    finally:
        backend.close()


def test_a_worker_dying_mid_call_is_a_crash_of_that_call(tiny_model: Path, hooks: None) -> None:
    """Only a death while a call runs is `WorkerCrashed` (what the quarantine counts); the quarantine
    tests cover the other half: a worker found dead before a call, or not restarting, is not one."""
    backend = ProcessBackend(functools.partial(load_backend, ServerSettings(model=str(tiny_model), threads=1)))
    try:
        with pytest.raises(WorkerCrashed, match="exit code -9"):
            backend.score([ScoreRequest(sequences=[CRASH + [1, 2]])])
        assert backend.restarts == 1
    finally:
        backend.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_a_request_that_crashes_the_model_twice_is_quarantined_and_not_retried(tiny_model: Path, hooks: None) -> None:
    server = ServerProcess(tiny_model).wait_ready()
    try:
        async def run() -> None:
            async with TeacherClient(server.url, retries=5, backoff_s=0.05) as client:
                with pytest.raises(TeacherError) as caught:  # crash, 503, retried; crash again: 422
                    await client.score([CRASH + [1, 2]], top_k=4)
                assert caught.value.status == 422 and caught.value.code == ErrorCode.QUARANTINED
                assert "crashed the model twice" in str(caught.value)
                sent = client.requests_per_replica()[server.url]
                with pytest.raises(TeacherError, match="quarantined"):
                    await client.score([CRASH + [1, 2]], top_k=4)
                assert client.requests_per_replica()[server.url] == sent + 1  # the 422 is not retried
                assert len(await client.score([[1, 2, 3]], top_k=4)) == 1  # everyone else is served

        asyncio.run(run())
        assert _metric(server.url, "trb_teacher_worker_restarts") == 2  # the third try never reached it
        assert _metric(server.url, "trb_teacher_quarantined_requests") == 1
    finally:
        server.stop()


def test_sigterm_cuts_off_a_hung_forward_after_the_grace_period(tiny_model: Path, hooks: None) -> None:
    server = ServerProcess(tiny_model, "--forward-deadline", "0", "--shutdown-grace", "1").wait_ready()
    workers = _workers(server.proc.pid)
    answer: list[int] = []

    def hang() -> None:
        try:
            answer.append(httpx.post(f"{server.url}/v1/score", json={"sequences": [HANG]}, timeout=120).status_code)
        except httpx.HTTPError:
            answer.append(-1)

    caller = threading.Thread(target=hang)
    caller.start()
    while not _metric(server.url, "trb_teacher_model_busy"):  # until the model runs it (and hangs)
        caller.join(timeout=0.05)
    server.proc.terminate()
    assert server.proc.wait(timeout=60) == 0  # no watchdog here: the grace period alone ends it
    caller.join(timeout=60)
    for _ in range(600):  # the resource tracker leaves once it reads its pipe's end
        if not any(_alive(pid) for pid in workers):
            break
        caller.join(timeout=0.05)
    assert workers and not any(_alive(pid) for pid in workers), workers  # no process left behind
    assert answer and answer[0] != 200


def _workers(server_pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == server_pid:
                kids.append(int(stat.parent.name))
        except (OSError, ValueError):
            continue
    return kids
