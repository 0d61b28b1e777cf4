"""``scripts/serve.sh`` on a fresh copy of the checkout: the first start sets up, the second does no install.

What it proves: on a tree with exactly the checkout's files (tracked plus untracked-but-not-ignored, so
uncommitted edits count, as in a clone of them), ``scripts/serve.sh --engine mock`` run twice sets up
its virtualenv once — through the real ``scripts/setup.sh`` and pip — and the second start skips
``setup.sh`` entirely (its log and fingerprint untouched) and is up in well under half the first
start's time. What it does not: download anything. The new virtualenv sees this test run's
site-packages through a ``.pth`` file, so pip finds every requirement already satisfied and installs
only the copy itself (editable); the full first install a newcomer waits for (about a minute, mostly
torch) is not repeated here. ``CHATSTREAM_VENV`` points ``serve.sh`` at that virtualenv.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
from servers import Server, free_port

REPO = Path(__file__).resolve().parents[2]


def _copy_checkout(target: Path) -> None:
    """The checkout's files (``git ls-files``: tracked, and untracked but not ignored) copied to ``target``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def _start(clone: Path, env: dict[str, str]) -> tuple[Server, float]:
    """``scripts/serve.sh --engine mock`` in ``clone``; the server once it answers, and how long that took."""
    port = free_port()
    started = time.monotonic()
    server = Server(["scripts/serve.sh", "--engine", "mock", "--port", str(port)], port, env, cwd=clone)
    try:
        server.wait_ready(timeout=300)
    except BaseException:
        server.stop()
        raise
    return server, time.monotonic() - started


def _stop(server: Server) -> str:
    server.signal(signal.SIGINT)
    assert server.wait_exit(15) == 0, server.output()
    output = server.output()
    server.stop()
    return output


@pytest.mark.skipif(not (REPO / ".git").exists() or shutil.which("git") is None, reason="needs a git checkout")
def test_second_start_does_no_install_and_is_quick(tmp_path: Path) -> None:
    clone, venv = tmp_path / "clone", tmp_path / "venv"
    _copy_checkout(clone)
    assert not (clone / ".venv").exists()
    # The virtualenv serve.sh will set up: it sees this run's packages, so pip has nothing to download.
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    where = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site = Path(subprocess.check_output([venv / "bin/python", "-c", where], text=True).strip())
    (site / "_test_shared_packages.pth").write_text(
        "\n".join(dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])) + "\n"
    )
    # python3 on PATH is this run's interpreter (setup.sh makes the virtualenv with it); no PYTHONPATH leaks in.
    env = {"CHATSTREAM_VENV": str(venv), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": ""}  # fmt: skip

    first, first_time = _start(clone, env)
    first_log = _stop(first)
    assert "Setting up" in first_log and "chatstream-asgi (editable) and its extras" in first_log, first_log
    assert "Location" not in first_log and "WARNING" not in first_log  # pip's chatter stays in setup.log
    stamp, setup_log = venv / ".chatstream-setup", venv / "setup.log"
    marks = (stamp.read_text(), setup_log.stat().st_mtime_ns)

    second, second_time = _start(clone, env)
    second_log = _stop(second)
    assert "Setting up" not in second_log, second_log
    assert (stamp.read_text(), setup_log.stat().st_mtime_ns) == marks  # setup.sh did not run at all
    assert "ready in" in second_log
    print(f"first start (setup with nothing to download) {first_time:.1f} s, second start {second_time:.1f} s")
    assert second_time < first_time / 2
