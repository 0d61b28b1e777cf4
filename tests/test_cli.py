"""``python -m chatstream_asgi serve --engine mock``: starts, streams, answers the APIs, stops on SIGINT."""

from __future__ import annotations

import json
import signal
import sys
import time

import httpx
import pytest
from servers import Server, free_port


def _serve_mock(*options: str) -> Server:
    port = free_port()
    command = [sys.executable, "-m", "chatstream_asgi", "serve", "--engine", "mock", "--host", "127.0.0.1",
               "--port", str(port), *options]  # fmt: skip
    return Server(command, port, {})


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
            assert client.get("/get_load").json() | {"estimated_wait_seconds": 0} == {
                "processing": 0,
                "waiting": 0,
                "max_processing": 2,
                "max_waiting": 3,
                "estimated_wait_seconds": 0,
            }
            metrics = client.get("/metrics")
            assert metrics.status_code == 200
            assert 'chatstream_completions_total{state="success"} 2.0' in metrics.text
        server.signal(signal.SIGINT)
        assert server.wait_exit(15) == 0, server.output()
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
        server.wait_ready()
        with (
            httpx.Client(base_url=server.url, timeout=10.0) as client,
            client.stream("POST", "/chat_stream", json={"user_input": "go", "format": "ndjson"}) as response,
        ):
            lines = response.iter_lines()
            assert json.loads(next(lines))["type"] == "delta"
            server.signal(sig)
            _wait_for_log(server, "shutting down: draining open replies")
            refused = client.post("/chat_stream", json={"user_input": "too late"})
            events = [json.loads(line) for line in lines]
        assert refused.status_code == 503
        assert refused.json() == {"error": "server_shutting_down"}
        assert events[-1].items() >= last_event.items()
        assert all(event["type"] == "delta" for event in events[:-1])
        assert server.wait_exit(15) == 0
        assert f"completed: {state}" in server.output()
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
