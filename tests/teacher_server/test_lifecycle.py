"""Process lifecycle: SIGTERM drains in-flight requests, then the server exits cleanly."""

from __future__ import annotations

import re
import signal
import threading
import time
from pathlib import Path

import httpx

from conftest import ServerProcess, free_port


def _model_busy(url: str) -> bool:
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    return re.search(r"^trb_teacher_model_busy 1(\.0)?$", metrics, re.M) is not None


def test_sigterm_drains_in_flight_requests(tiny_model: Path) -> None:
    server = ServerProcess(tiny_model).wait_ready()
    results: list[int] = []

    def slow_request() -> None:  # ~1-2 s of work on one thread
        body = {"sequences": [[1, *range(4, 44)] * 12] * 64, "top_k": 20}
        results.append(httpx.post(f"{server.url}/v1/score", json=body, timeout=60).status_code)

    worker = threading.Thread(target=slow_request)
    worker.start()
    deadline = time.monotonic() + 60
    while not _model_busy(server.url):  # the request is in flight (on a loaded machine it takes a while)
        assert worker.is_alive(), "the request ended before the SIGTERM; lengthen it"
        assert time.monotonic() < deadline, "the request never reached the model"
        time.sleep(0.01)
    server.proc.send_signal(signal.SIGTERM)
    worker.join(timeout=60)
    assert results == [200]
    assert server.proc.wait(timeout=30) == 0
    server.stop()


def _wait_listening(server: ServerProcess, timeout_s: float = 60) -> httpx.Response:
    """The first answer to /ready, as soon as the server listens."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return httpx.get(f"{server.url}/ready", timeout=2)
        except httpx.TransportError:
            assert server.proc.poll() is None, "the teacher exited instead of listening"
            assert time.monotonic() < deadline, "the teacher did not listen while its engine starts"
            time.sleep(0.1)


def test_listens_while_its_engine_starts_and_sigterm_stops_it(tiny_model: Path) -> None:
    """An engine backend waits for its engine; meanwhile the teacher answers /ready 503 with the reason
    (JSON, no key needed), and SIGTERM stops it at once, waiting loader and all."""
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there: the engine "starts" forever
    server = ServerProcess(tiny_model, "--backend", "vllm", "--vllm-url", dead, "--engine-wait", "600")
    try:
        resp = _wait_listening(server)
        assert resp.status_code == 503 and resp.headers["retry-after"]
        assert resp.json()["error"]["code"] == "not_ready" and "starting" in resp.json()["error"]["message"]
        score = httpx.post(f"{server.url}/v1/score", json={"sequences": [[1, 2]]}, timeout=5)
        assert score.status_code == 503 and score.json()["error"]["code"] == "not_ready"
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(timeout=30)
        assert time.monotonic() - started < 15
    finally:
        server.stop()


def test_an_engine_that_never_answers_fails_the_start_after_the_wait(tiny_model: Path, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    log = tmp_path / "teacher.log"
    server = ServerProcess(tiny_model, "--backend", "vllm", "--vllm-url", dead, "--engine-wait", "3", log=log)
    try:
        assert _wait_listening(server).status_code == 503
        assert server.proc.wait(timeout=60) == 1
        assert "was not healthy after 3s (engine_wait_s)" in log.read_text()
    finally:
        server.stop()
