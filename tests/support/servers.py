"""Real servers for tests: hypercorn, uvicorn or granian serving an app in a subprocess.

``running(server, "chat_app:app")`` starts the server on a free 127.0.0.1 port with ``tests/support/apps``
on the import path, waits (bounded) until it answers, and stops it on exit. Environment variables
configure the app.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx

SERVERS = ("hypercorn", "uvicorn", "granian")
APPS_DIR = Path(__file__).parent / "apps"
REPO_ROOT = Path(__file__).parents[2]
GRACEFUL_TIMEOUT = 1


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(server: str, app: str, port: int) -> list[str]:
    """The command line that serves ``app`` (``module:attr``) with ``server`` on ``port``."""
    python = sys.executable
    if server == "hypercorn":
        return [python, "-m", "hypercorn", "--bind", f"127.0.0.1:{port}", "--graceful-timeout",
                str(GRACEFUL_TIMEOUT), app]  # fmt: skip
    if server == "uvicorn":
        return [python, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port), "--lifespan", "on",
                "--timeout-graceful-shutdown", str(GRACEFUL_TIMEOUT), app]  # fmt: skip
    if server == "granian":
        return [python, "-m", "granian", "--interface", "asgi", "--host", "127.0.0.1", "--port", str(port),
                "--loop", "asyncio", "--workers", "1", app]  # fmt: skip
    raise ValueError(f"unknown server {server!r}")


class Server:
    """A server subprocess; ``url`` is its base URL."""

    def __init__(self, command: list[str], port: int, env: Mapping[str, str], cwd: Path = REPO_ROOT) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        # The server writes through the same open file as output() reads: without O_APPEND a line written
        # while output() has sought back to the start lands there, over older output, and is never seen.
        fcntl.fcntl(self.log.fileno(), fcntl.F_SETFL, fcntl.fcntl(self.log.fileno(), fcntl.F_GETFL) | os.O_APPEND)
        pythonpath = os.pathsep.join([str(APPS_DIR), str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
        self.process = subprocess.Popen(
            command,
            cwd=cwd,
            env={**os.environ, "PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1", **env},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, path: str = "/get_load", timeout: float = 20.0) -> None:
        """Poll ``path`` until it answers 200; fails if the deadline passes or the server exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.output()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(self.url + path, timeout=1.0).status_code == 200:
                    return
            time.sleep(0.05)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.output()}")

    def signal(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    def wait_exit(self, timeout: float) -> int:
        """The exit code; raises ``subprocess.TimeoutExpired`` if it does not exit in time."""
        return self.process.wait(timeout)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a deadline."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.log.close()


@contextlib.contextmanager
def running(
    server: str,
    app: str = "chat_app:app",
    env: Mapping[str, str] | None = None,
    *,
    ready_path: str = "/get_load",
) -> Iterator[Server]:
    """Serve ``app`` with ``server`` for the duration of the block."""
    port = free_port()
    srv = Server(server_command(server, app, port), port, env or {})
    try:
        srv.wait_ready(ready_path)
        yield srv
    finally:
        srv.stop()
