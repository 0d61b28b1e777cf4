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


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_shutdown_drains_then_aborts_open_streams_with_an_error_frame(sig: signal.Signals) -> None:
    """A signal stops admission at once, lets open replies run for --shutdown-timeout, then ends them
    with a ``server_shutting_down`` error frame (``unknown_error_occurred``), not a cut connection."""
    server = _serve_mock("--concurrency", "1", "--queue", "1", "--max-new-tokens", "400", "--mock-type", "long",
                         "--mock-time-per-token", "0.02", "--shutdown-timeout", "0.5")  # fmt: skip
    try:
        server.wait_ready()
        with (
            httpx.Client(base_url=server.url, timeout=10.0) as client,
            client.stream("POST", "/chat_stream", json={"user_input": "go", "format": "ndjson"}) as response,
        ):
            lines = response.iter_lines()
            assert json.loads(next(lines))["type"] == "delta"
            server.signal(sig)
            events = [json.loads(line) for line in lines]
        assert events[-1]["type"] == "error"
        assert events[-1]["error"] == "server_shutting_down"
        assert all(event["type"] == "delta" for event in events[:-1])
        assert server.wait_exit(15) == 0
        assert "completed: unknown_error_occurred" in server.output()
    finally:
        server.stop()


def test_shutdown_lets_a_reply_that_ends_in_time_succeed_and_refuses_new_ones() -> None:
    server = _serve_mock("--concurrency", "1", "--queue", "1", "--max-new-tokens", "40", "--mock-type", "long",
                         "--mock-time-per-token", "0.02", "--shutdown-timeout", "10")  # fmt: skip
    try:
        server.wait_ready()
        with (
            httpx.Client(base_url=server.url, timeout=10.0) as client,
            client.stream("POST", "/chat_stream", json={"user_input": "go", "format": "ndjson"}) as response,
        ):
            lines = response.iter_lines()
            assert json.loads(next(lines))["type"] == "delta"
            server.signal(signal.SIGTERM)
            _wait_for_log(server, "shutting down: draining open replies")
            refused = client.post("/chat_stream", json={"user_input": "too late"})
            events = [json.loads(line) for line in lines]
        assert refused.status_code == 503
        assert refused.json() == {"error": "server_shutting_down"}
        assert events[-1]["type"] == "done"
        assert events[-1]["state"] == "success"
        assert server.wait_exit(15) == 0
        assert "completed: success" in server.output()
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
