"""Process lifecycle: SIGTERM drains in-flight requests, then the server exits cleanly."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx

from conftest import ServerProcess


def test_sigterm_drains_in_flight_requests(tiny_model: Path) -> None:
    server = ServerProcess(tiny_model).wait_ready()
    results: list[int] = []

    def slow_request() -> None:  # ~1-2 s of work on one thread
        body = {"sequences": [[1, *range(4, 44)] * 12] * 64, "top_k": 20}
        results.append(httpx.post(f"{server.url}/v1/score", json=body, timeout=60).status_code)

    worker = threading.Thread(target=slow_request)
    worker.start()
    time.sleep(0.3)  # the request is in flight
    server.proc.send_signal(signal.SIGTERM)
    worker.join(timeout=60)
    assert results == [200]
    assert server.proc.wait(timeout=30) == 0
    server.stop()
