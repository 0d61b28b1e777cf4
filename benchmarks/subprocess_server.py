"""A server in a subprocess for the benchmarks: started on a free port, ready when a path answers 200."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping

import httpx

__all__ = ["serve_subprocess"]


@contextlib.contextmanager
def serve_subprocess(
    command: Callable[[int], list[str]], ready_path: str, env: Mapping[str, str], start_timeout: float = 30.0
) -> Iterator[str]:
    """Run ``command(port)`` until the block ends; yields the base URL once ``ready_path`` answers 200."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen(command(port), env=dict(env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(command(port))} did not start")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + ready_path, timeout=1).status_code == 200:
                    break
            time.sleep(0.05)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
