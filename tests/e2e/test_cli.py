"""``python -m chatstream_asgi serve --engine mock``: starts, streams, answers the APIs, stops on SIGINT."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from servers import Server, free_port


def _serve_mock(*options: str) -> Server:
    port = free_port()
    command = [sys.executable, "-m", "chatstream_asgi", "serve", "--engine", "mock", "--host", "127.0.0.1",
               "--port", str(port), *options]  # fmt: skip
    return Server(command, port, {})


@contextlib.contextmanager
def _mid_reply(server: Server) -> Iterator[tuple[httpx.Client, Iterator[str]]]:
    """A streamed ndjson reply from ``server`` (once ready), its first delta read: the client, the rest of its lines."""
    server.wait_ready()
    with (
        httpx.Client(base_url=server.url, timeout=10.0) as client,
        client.stream("POST", "/chat_stream", json={"user_input": "go", "format": "ndjson"}) as response,
    ):
        lines = response.iter_lines()
        assert json.loads(next(lines))["type"] == "delta"
        yield client, lines


def _wait_for_log(server: Server, line: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while line not in server.output():
        assert time.monotonic() < deadline, f"no {line!r} in the server log:\n{server.output()}"
        time.sleep(0.02)


def test_serve_mock_streams_and_stops_cleanly_on_sigint() -> None:
    server = _serve_mock("--concurrency", "2", "--queue", "3", "--max-new-tokens", "8",
                         "--mock-type", "echo", "--mock-initial-wait", "0", "--mock-time-per-token", "0")  # fmt: skip
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=5.0) as client:
            with client.stream("POST", "/chat_stream", json={"user_input": "echo these words back"}) as response:
                assert response.status_code == 200
                assert response.headers["x-chatstream-last-generated-message-id"]
                assert b"".join(response.iter_raw()) == b"echo these words back"
            too_long = client.post("/chat_stream", json={"messages": [{"role": "user", "content": "w " * 20}]})
            assert too_long.text == " ".join(["w"] * 8)  # cut at --max-new-tokens
            load = client.get("/get_load").json()
            assert load | {"estimated_wait_seconds": 0} == {
                "processing": 0,
                "waiting": 0,
                "max_processing": 2,
                "max_waiting": 3,
                "estimated_wait_seconds": 0,
                "generated_tokens": load["generated_tokens"],
            }
            metrics = client.get("/metrics")
            assert metrics.status_code == 200
            assert 'chatstream_completions_total{state="success"} 2.0' in metrics.text
            assert f"chatstream_generated_tokens_total {load['generated_tokens']:.1f}" in metrics.text
            assert load["generated_tokens"] >= 8
        server.signal(signal.SIGINT)
        assert server.wait_exit(15) == 0, server.output()
    finally:
        server.stop()


def test_ctrl_c_again_while_the_stopped_server_exits_prints_no_traceback() -> None:
    """A second Ctrl+C that lands after the server stopped, while the interpreter finalizes (torch's exit
    hooks take a moment), is ignored: no ``KeyboardInterrupt`` traceback on the way out. The process sends
    it to itself from an exit hook, which is when a user's second press arrives."""
    port = free_port()
    argv = ["serve", "--engine", "mock", "--host", "127.0.0.1", "--port", str(port)]
    code = (
        "import atexit, os, signal, time\nfrom chatstream_asgi.cli import main\n"
        "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(0.2)))\n"
        f"main({argv!r})"
    )
    server = Server([sys.executable, "-c", code], port, {})
    try:
        server.wait_ready()
        server.signal(signal.SIGINT)
        assert server.wait_exit(15) == 0
        assert "shutting down" in server.output()
        assert "KeyboardInterrupt" not in server.output(), server.output()
    finally:
        server.stop()


def test_serve_called_off_the_main_thread_serves() -> None:
    """``main()`` called from a thread (an app embedding the server) serves instead of failing on the signal
    handlers that only the main thread may set; signals then stay the process's (SIGTERM ends it)."""
    port = free_port()
    argv = ["serve", "--engine", "mock", "--host", "127.0.0.1", "--port", str(port), "--mock-type", "echo",
            "--mock-initial-wait", "0", "--mock-time-per-token", "0"]  # fmt: skip
    thread = f"threading.Thread(target=main, args=[{argv!r}])"
    code = f"import threading\nfrom chatstream_asgi.cli import main\n{thread}.start()"
    server = Server([sys.executable, "-c", code], port, {})
    try:
        server.wait_ready()
        reply = httpx.post(server.url + "/chat_stream", json={"user_input": "from a thread"}, timeout=5.0)
        assert (reply.status_code, reply.text) == (200, "from a thread")
        assert "Traceback" not in server.output()
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("sig", "max_new_tokens", "shutdown_timeout", "last_event", "state"),
    [
        # The reply outlasts --shutdown-timeout: it ends with an error frame, not a cut connection.
        (signal.SIGTERM, "400", "2", {"type": "error", "error": "server_shutting_down"}, "unknown_error_occurred"),
        (signal.SIGINT, "400", "2", {"type": "error", "error": "server_shutting_down"}, "unknown_error_occurred"),
        # The reply ends within --shutdown-timeout: it completes normally.
        (signal.SIGTERM, "40", "10", {"type": "done", "state": "success"}, "success"),
    ],
)
def test_shutdown_refuses_new_requests_and_drains_open_replies(
    sig: signal.Signals, max_new_tokens: str, shutdown_timeout: str, last_event: dict[str, str], state: str
) -> None:
    """A signal stops admission at once (503), lets open replies run for --shutdown-timeout, then ends
    the rest with a ``server_shutting_down`` error frame (``unknown_error_occurred``) before the server stops."""
    server = _serve_mock("--concurrency", "1", "--queue", "1", "--max-new-tokens", max_new_tokens,
                         "--mock-type", "long", "--mock-time-per-token", "0.02",
                         "--shutdown-timeout", shutdown_timeout)  # fmt: skip
    try:
        with _mid_reply(server) as (client, lines):
            server.signal(sig)
            _wait_for_log(server, "shutting down: draining open replies")
            refused = client.post("/chat_stream", json={"user_input": "too late"})
            events = [json.loads(line) for line in lines]
        assert refused.status_code == 503
        assert refused.json() == {"error": "server_shutting_down", "detail": "the server is shutting down"}
        assert events[-1].items() >= last_event.items()
        assert all(event["type"] == "delta" for event in events[:-1])
        assert server.wait_exit(15) == 0
        assert f"completed: {state}" in server.output()
    finally:
        server.stop()


def test_a_second_signal_stops_the_drain_now() -> None:
    """Ctrl+C twice: the first starts the drain (up to --shutdown-timeout, here 600 s, longer than the
    reply's 20 s), the second ends the open reply at once with the error frame, and the server exits."""
    server = _serve_mock("--concurrency", "1", "--max-new-tokens", "400", "--mock-type", "long",
                         "--mock-time-per-token", "0.05", "--shutdown-timeout", "600")  # fmt: skip
    try:
        with _mid_reply(server) as (_, lines):
            server.signal(signal.SIGINT)
            _wait_for_log(server, "Ctrl+C again to stop now")
            server.signal(signal.SIGINT)
            events = [json.loads(line) for line in lines]
        assert events[-1].items() >= {"type": "error", "error": "server_shutting_down"}.items()
        assert server.wait_exit(15) == 0
        assert "stopping now: open replies end with an error frame" in server.output()
        assert "completed: unknown_error_occurred" in server.output()
    finally:
        server.stop()


def test_serve_openai_engine_streams_from_a_remote_server() -> None:
    """``--engine openai --remote-url`` fronts another OpenAI-compatible server (here a mock one)."""
    remote = _serve_mock("--mock-type", "echo", "--mock-time-per-token", "0")
    try:
        remote.wait_ready()
        port = free_port()
        command = [sys.executable, "-m", "chatstream_asgi", "serve", "--engine", "openai", "--host", "127.0.0.1",
                   "--port", str(port), "--remote-url", remote.url + "/v1"]  # fmt: skip
        front = Server(command, port, {})
        try:
            front.wait_ready()
            response = httpx.post(front.url + "/chat_stream", json={"user_input": "relayed words"}, timeout=10.0)
            assert response.status_code == 200
            assert response.text == "relayed words"
            assert httpx.get(front.url + "/v1/models").json()["data"][0]["id"] == "mock"
        finally:
            front.stop()
    finally:
        remote.stop()


REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str, argv0: str | None = None, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run the CLI to completion: as ``python -m chatstream_asgi``, or as a script named ``argv0``."""
    if argv0 is None:
        command = [sys.executable, "-m", "chatstream_asgi", *args]
    else:
        code = f"import sys; sys.argv[0] = {argv0!r}; from chatstream_asgi.cli import main; main({list(args)!r})"
        command = [sys.executable, "-c", code]
    env = os.environ | {"COLUMNS": "200"}  # argparse wraps help to the terminal: one line per option
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


def test_help_shows_defaults_in_plain_text_under_the_name_it_was_called_by() -> None:
    module = _cli("serve", "--help")
    assert module.returncode == 0
    assert module.stdout.startswith("usage: python -m chatstream_asgi serve [-h]")
    for option, default in [("--port", "8000"), ("--concurrency", "4"), ("--queue", "16"), ("--max-new-tokens", "256"),
                            ("--host", "127.0.0.1"), ("--engine", "transformers")]:  # fmt: skip
        block = re.search(rf"^  {option} .*?(?=^  -|^$)", module.stdout, re.MULTILINE | re.DOTALL)
        assert block and block[0].rstrip().endswith(f"(default: {default})"), option
    assert "--temperature" in module.stdout and "--top-p" in module.stdout
    assert "``" not in module.stdout and ":class:" not in module.stdout
    script = _cli("serve", "--help", argv0="/somewhere/bin/chatstream-asgi")
    assert script.stdout.startswith("usage: chatstream-asgi serve [-h]")
    assert "  chatstream-asgi serve --engine mock" in script.stdout  # the examples use the same name
    assert _cli("--help", argv0="chatstream-asgi").stdout.startswith("usage: chatstream-asgi [-h] COMMAND")


def test_flags_read_right_and_bad_gpu_options_are_refused_at_once() -> None:
    help_text = _cli("serve", "--help").stdout
    block = re.search(r"^  --no-admin-endpoints .*?(?=^  -)", help_text, re.MULTILINE | re.DOTALL)
    assert block and "default" not in block[0]  # a flag's default is not shown as "(default: True)"
    assert "default: 256" in help_text and "default: 128" in help_text  # --max-new-tokens, --max-prefill-tokens
    negative = _cli("serve", "--max-prefill-tokens", "-5")
    assert negative.returncode == 2 and "--max-prefill-tokens must be 0 (no cap) or more" in negative.stderr
    both = _cli("serve", "--kv-cache-memory", "1", "--gpu-memory-utilization", "0.5")
    assert both.returncode == 2 and "not allowed with argument --kv-cache-memory" in both.stderr


def test_busy_port_is_one_line_before_the_model_loads() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = _cli("serve", "--port", str(port))  # the default engine: SmolLM2, never loaded
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: port {port} on 127.0.0.1 is already in use (another server?): stop it or pick another with --port"
    )
    assert "Traceback" not in done.stderr
    assert "loading model" not in done.stderr and "torch" not in done.stderr


def test_missing_model_file_is_one_line_before_anything_loads() -> None:
    done = _cli("serve", "--model", "./no-such-model.gguf", "--port", str(free_port()))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "error: model './no-such-model.gguf' not found: no such file or directory"
    )
    assert "Traceback" not in done.stderr and "loading model" not in done.stderr


def test_sampling_flags_and_start_up_log() -> None:
    """--temperature etc. set the server's default sampling; the log says so, says where to point a browser,
    and has every line once (hypercorn's own included)."""
    server = _serve_mock("--temperature", "0.3", "--top-p", "0.8", "--top-k", "5", "--repetition-penalty", "1.2")
    try:
        server.wait_ready()
        params = httpx.get(server.url + "/get_generation_params").json()
        assert params == {"temperature": 0.3, "top_p": 0.8, "top_k": 5, "repetition_penalty": 1.2}
        _wait_for_log(server, "Running on")
        log = server.output()
        assert "sampling: temperature 0.3, top-p 0.8, top-k 5, repetition penalty 1.2" in log
        assert f"open {server.url}/ in a browser" in log
        assert log.count("Running on") == 1
        assert "WARNING" not in log  # no session-secret warning for the in-memory sessions of one process
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("flag", "value"), [("--temperature", "-1"), ("--top-p", "0"), ("--top-p", "1.5"), ("--top-k", "-1")]
)
def test_out_of_range_sampling_flag_is_a_usage_error(flag: str, value: str) -> None:
    done = _cli("serve", "--engine", "mock", flag, value)
    assert done.returncode == 2
    assert f"argument {flag}: must be" in done.stderr.strip().splitlines()[-1]


def test_serving_without_torch_names_the_extra_in_one_line() -> None:
    serve = f"main(['serve', '--port', '{free_port()}'])"
    code = f"import sys; sys.modules['torch'] = None; from chatstream_asgi.cli import main; {serve}"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the transformers engine needs torch, which is not installed")
    assert "pip install -e '.[transformers]'" in last and "Traceback" not in done.stderr


@pytest.mark.smollm2
@pytest.mark.parametrize(
    ("moment", "ignored"),
    [("loading model SmolLM2-135M-Instruct", False), ("now the weights", False), ("now the weights", True)],
)
def test_ctrl_c_while_the_model_loads_exits_without_a_traceback(moment: str, ignored: bool) -> None:
    """At the load's start (torch imported) and while the weights load (the loading thread inside torch's
    kernels, where finalizing the interpreter around it once aborted the process): 130, one line. Also when
    started with SIGINT ignored, as a shell leaves a command it starts in the background."""
    port = free_port()
    argv = f"sys.argv = ['chatstream_asgi', 'serve', '--port', '{port}']"
    serve = f"{argv}; runpy.run_module('chatstream_asgi', run_name='__main__')"
    ignore = "signal.signal(signal.SIGINT, signal.SIG_IGN); " if ignored else ""
    command = [sys.executable, "-c", f"import runpy, signal, sys; {ignore}{serve}"]
    server = Server(command, port, {})
    try:
        _wait_for_log(server, moment, timeout=60)
        server.signal(signal.SIGINT)
        assert server.wait_exit(90) == 130  # a hang detector: a loaded 2-core machine took over 30 s once
        assert "interrupted while loading" in server.output()
        assert "Traceback" not in server.output()
    finally:
        server.stop()


def test_request_timeout_ends_a_stalled_reply() -> None:
    """``--request-timeout``: a reply whose first token would come after 60 s ends with a 504."""
    server = _serve_mock("--request-timeout", "0.5", "--mock-initial-wait", "60")
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=10.0) as client:
            response = client.post("/chat_stream", json={"user_input": "hello"})
            assert response.status_code == 504
            assert response.json()["error"] == "deadline_exceeded"
            assert client.get("/get_load").json()["processing"] == 0
    finally:
        server.stop()


@pytest.mark.parametrize(("devices", "hidden"), [(["cpu"], True), (["cpu", "cuda:1"], False)])
def test_a_cpu_server_keeps_triton_out(monkeypatch: pytest.MonkeyPatch, devices: list[str], hidden: bool) -> None:
    pytest.importorskip("torch")
    from chatstream_asgi import cli

    monkeypatch.delitem(sys.modules, "triton", raising=False)
    cli._without_triton_on_cpu(devices)  # type: ignore[arg-type]
    assert ("triton" in sys.modules and sys.modules["triton"] is None) == hidden
