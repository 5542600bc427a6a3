"""The model worker process: same answers as the in-process backend, and a server that outlives it."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import ServerProcess, f32_diff
from shared.protocol import ScoreRequest
from student_trainer.teacher.client import TeacherClient
from teacher_server.backends.base import Backend
from teacher_server.backends.factory import load_backend
from teacher_server.backends.hf import HFBackend
from teacher_server.settings import ServerSettings
from teacher_server.worker import ProcessBackend, RemoteSession, SessionLost, WorkerDied


@pytest.fixture(scope="module")
def remote(tiny_model: Path) -> Iterator[ProcessBackend]:
    backend = ProcessBackend(functools.partial(load_backend, ServerSettings(model=str(tiny_model), threads=1)))
    yield backend
    backend.close()


def _close(got: np.ndarray, want: np.ndarray) -> None:
    """The same computation in another process: the worker runs 1 torch thread, this process any number,
    and a GEMM split between threads rounds differently (6e-7 seen at 2 threads)."""
    diff, tol = f32_diff(got, want, atol=1e-6)
    assert diff <= tol, (diff, tol)


def test_worker_answers_like_the_backend_in_process(remote: ProcessBackend, tiny_model: Path) -> None:
    local = HFBackend(str(tiny_model))
    assert remote.info == local.info
    req = ScoreRequest(sequences=[[1, 5, 9, 7], [1, 4]], start=[1, 0], top_k=5, token_ids=[3, 4])
    for a, b in zip(remote.score([req])[0], local.score([req])[0], strict=True):
        assert a.start == b.start and np.array_equal(a.top_ids, b.top_ids)
        _close(a.top_logprobs, b.top_logprobs)
        _close(a.token_logprobs, b.token_logprobs)

    state, first = remote.open_session([[1, 5, 9], [1, 4]], top_k=5)
    local_state, local_first = local.open_session([[1, 5, 9], [1, 4]], top_k=5)
    assert np.array_equal(first.top_ids, local_first.top_ids)
    step = remote.extend_session(state, [1], [[6, 7]], top_k=5)
    local_step = local.extend_session(local_state, [1], [[6, 7]], top_k=5)
    _close(step.top_logprobs, local_step.top_logprobs)
    assert state.lengths == local_state.lengths == [3, 4]  # the handle follows the worker's state
    assert state.nbytes == local_state.nbytes > 0


def test_closed_sessions_are_freed_in_the_worker(remote: ProcessBackend) -> None:
    state, _ = remote.open_session([[1, 5, 9]], top_k=3)
    state.close()  # queued, sent with the next call
    remote.score([ScoreRequest(sequences=[[1, 2]])])
    with pytest.raises(SessionLost):
        remote.extend_session(state, [0], [[4]], top_k=3)


def test_a_dropped_handle_frees_its_session(remote: ProcessBackend) -> None:
    state, _ = remote.open_session([[1, 5, 9]], top_k=3)
    sid = state.sid
    del state  # e.g. a session refused by the memory cap, never stored
    remote.score([ScoreRequest(sequences=[[1, 2]])])
    ghost = RemoteSession(remote, sid, remote.generation, [3], 0)
    with pytest.raises(SessionLost):
        remote.extend_session(ghost, [0], [[4]], top_k=3)


def test_a_killed_worker_is_replaced_and_its_sessions_read_as_lost(remote: ProcessBackend) -> None:
    state, _ = remote.open_session([[1, 5, 9]], top_k=3)
    old_pid = remote.pid
    os.kill(old_pid, signal.SIGKILL)
    _wait_dead(old_pid)
    # killed while idle: the next call finds it dead, replaces it and runs on the new one (no 503,
    # and no WorkerCrashed: the quarantine must not blame a call for a death before it was sent)
    assert remote.score([ScoreRequest(sequences=[[1, 2]])])[0][0].top_ids.shape == (2, 20)
    assert remote.pid != old_pid and remote.restarts == 1
    with pytest.raises(SessionLost):
        remote.extend_session(state, [0], [[4]], top_k=3)


def _wait_dead(pid: int, timeout_s: float = 60) -> None:
    """Until a SIGKILLed process has exited: gone, or a zombie with no thread left. Its main thread
    turns zombie first while the others still unwind (for over a second on a loaded machine), and
    until they have, its parent cannot tell that it died."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            threads = len(os.listdir(f"/proc/{pid}/task"))
        except (OSError, IndexError):
            return
        if state in ("Z", "X") and threads <= 1:
            return
        assert time.monotonic() < deadline, f"process {pid} still {state} with {threads} threads after SIGKILL"
        time.sleep(0.01)


def _load_unless(marker: Path, cfg: ServerSettings) -> Backend:
    if marker.exists():
        raise OSError(f"cannot load: {marker} says so")
    return load_backend(cfg)


def test_a_failed_restart_answers_503_until_a_later_start_works(tiny_model: Path, tmp_path: Path) -> None:
    marker = tmp_path / "broken"
    backend = ProcessBackend(functools.partial(_load_unless, marker, ServerSettings(model=str(tiny_model))))
    try:
        os.kill(backend.pid, signal.SIGKILL)
        marker.touch()
        with pytest.raises(WorkerDied, match="could not be restarted"):
            backend.score([ScoreRequest(sequences=[[1, 2]])])
        assert not backend.ready and backend.pid is None
        started = time.monotonic()
        with pytest.raises(WorkerDied, match="is down"):  # no reload attempt during the pause
            backend.score([ScoreRequest(sequences=[[1, 2]])])
        assert time.monotonic() - started < 0.5
        marker.unlink()
        backend._retry_at = 0.0  # the pause is over
        assert backend.score([ScoreRequest(sequences=[[1, 2]])])[0][0].top_ids.shape == (2, 20)
        assert backend.ready
    finally:
        backend.close()


def test_a_model_that_fails_to_load_fails_the_start(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        ProcessBackend(functools.partial(load_backend, ServerSettings(model=str(tmp_path / "missing"))))


def _children(pid: int) -> list[int]:
    """Child processes of `pid`, from /proc (the worker is spawned from one of the server's threads)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _worker_pid(server_pid: int) -> int:
    """The server's spawned model process (its other child is multiprocessing's resource tracker)."""
    for pid in _children(server_pid):
        if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text():
            return pid
    raise AssertionError(f"no model process among {_children(server_pid)}")


def test_server_survives_its_worker_and_clients_carry_on(tiny_model: Path) -> None:
    server = ServerProcess(tiny_model).wait_ready()
    try:
        async def run() -> None:
            async with TeacherClient(server.url, retries=3, backoff_s=0.05) as client:
                session = await client.open_session([[1, 5, 9], [1, 4, 4]], top_k=4)
                before = await session.extend([[7], [8]])
                worker = _worker_pid(server.proc.pid)
                os.kill(worker, signal.SIGKILL)
                _wait_dead(worker)
                # the first call after the kill meets the dead worker (503, retried), the session
                # is gone (404, rebuilt from the prefixes), and the answer matches a fresh scoring
                after = await session.extend([[3], [3]])
                fresh = await client.score(session.prefixes, start=[3, 4], top_k=4)
                for row in range(2):
                    assert np.array_equal(after.ids[row].numpy(), fresh[row].topk.ids[-1].numpy())
                    np.testing.assert_allclose(after.logprobs[row].numpy(), fresh[row].topk.logprobs[-1].numpy(),
                                               atol=1e-5)
                assert before.ids.shape == after.ids.shape

        asyncio.run(run())
        assert server.proc.poll() is None
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'code="not_ready"' in metrics or 'code="session_not_found"' in metrics
    finally:
        server.stop()


def test_model_thread_mode_still_serves(tiny_model: Path) -> None:
    server = ServerProcess(tiny_model, "--model-thread").wait_ready()
    try:
        resp = httpx.post(f"{server.url}/v1/score", json={"sequences": [[1, 2, 3]], "top_k": 2})
        assert resp.status_code == 200 and len(resp.json()["results"]) == 1
        assert not _children(server.proc.pid)
    finally:
        server.stop()
