"""A server in a subprocess for the benchmarks: started on a free port, ready when a path answers 200."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from typing import IO

import httpx

__all__ = ["running_subprocess", "serve_subprocess"]


@contextlib.contextmanager
def serve_subprocess(
    command: Callable[[int], list[str]], ready_path: str, env: Mapping[str, str], start_timeout: float = 30.0
) -> Iterator[str]:
    """Run ``command(port)`` until the block ends; yields the base URL once ``ready_path`` answers 200."""
    with running_subprocess(command, ready_path, env, start_timeout) as (url, _):
        yield url


@contextlib.contextmanager
def running_subprocess(
    command: Callable[[int], list[str]],
    ready_path: str,
    env: Mapping[str, str],
    start_timeout: float = 30.0,
    log: IO[str] | None = None,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """:func:`serve_subprocess` that also yields the process (to read its memory) and can keep its output in
    ``log``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    output = log if log is not None else subprocess.DEVNULL
    process = subprocess.Popen(command(port), env=dict(env), stdout=output, stderr=subprocess.STDOUT)
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
        yield url, process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
