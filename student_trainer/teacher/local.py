"""Start a teacher server subprocess on a free 127.0.0.1 port when no teacher URL is configured."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalTeacher:
    """`trb-teacher serve` as a child process; `url` answers once `wait_ready` returns."""

    def __init__(self, model: str, *extra: str, port: int | None = None, threads: int | None = None,
                 log: Path | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "teacher_server.cli", "serve", "--model", model, "--host", "127.0.0.1",
               "--port", str(self.port), "--log-level", "warning", *extra]
        if threads:
            cmd += ["--threads", str(threads)]
        self._log = open(log, "a") if log else open(os.devnull, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=Path(__file__).resolve().parents[2])  # the repository root

    def wait_ready(self, timeout_s: float = 300.0, report: Callable[[str], None] | None = None,
                   report_every_s: float = 15.0) -> LocalTeacher:
        """Until /ready answers 200; a large teacher takes minutes to load, so `report` hears it now and then."""
        started = time.monotonic()
        deadline, next_report = started + timeout_s, started + report_every_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the local teacher server exited with code {self.proc.returncode}"
                                   f"{'; see ' + self._log.name if self._log.name != os.devnull else ''}")
            try:
                # /ready needs no API key; it answers 503 while the model loads (the server listens at once).
                if httpx.get(f"{self.url}/ready", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if report and time.monotonic() >= next_report:
                report(f"the local teacher server is still loading its model ({time.monotonic() - started:.0f}s "
                       f"of {timeout_s:.0f}s)")
                next_report += report_every_s
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"the local teacher server was not ready after {timeout_s:.0f}s "
                           "(teacher.ready_timeout_s sets how long to wait)")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> LocalTeacher:
        return self.wait_ready()

    def __exit__(self, *exc: object) -> None:
        self.stop()
