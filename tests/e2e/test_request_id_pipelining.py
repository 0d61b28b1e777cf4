"""A request's id is its own under uvicorn's HTTP/1.1 pipelining.

uvicorn starts the next pipelined request on a connection from inside the previous request's task, at the
moment that request's last byte is sent: the new task begins with a copy of the previous one's context
variables. A request id kept in a context variable must therefore be bound per request, never kept from an
earlier binding. Two requests written to one socket at once, the second without an ``X-Request-Id``: its
reply, its callback and its log lines must carry an id of its own.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import socket

import h11
import pytest
from live_server import uvicorn_in_thread

from chatstream_asgi import ChatStream, MockEngine, MockParams
from chatstream_asgi.logs import current_request_id
from chatstream_asgi.web.app import create_app

WATCHDOG = 20.0
IMPLEMENTATIONS = ["h11", *(["httptools"] if importlib.util.find_spec("httptools") else [])]


def request(content: str, headers: dict[str, str]) -> bytes:
    body = json.dumps({"messages": [{"role": "user", "content": content}]}).encode()
    head = {"host": "test", "content-type": "application/json", "content-length": str(len(body)), **headers}
    return (
        b"POST /chat_stream HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items()).encode() + b"\r\n" + body
    )


def pipelined(port: int, *requests: bytes) -> list[tuple[dict[str, str], bytes]]:
    """Write ``requests`` in one go on one connection; the responses, each as (headers, body), in order."""
    responses: list[tuple[dict[str, str], bytes]] = []
    with socket.create_connection(("127.0.0.1", port), timeout=WATCHDOG) as sock:
        sock.sendall(b"".join(requests))
        data = b""
        for _ in requests:
            client = h11.Connection(h11.CLIENT)  # one per response: h11's client does not pipeline itself
            client.send(h11.Request(method="POST", target="/", headers=[("host", "test"), ("content-length", "0")]))
            client.send(h11.EndOfMessage())
            if data:  # what came after the previous response (an empty read would mean the connection closed)
                client.receive_data(data)
            headers: dict[str, str] = {}
            body = b""
            while True:
                event = client.next_event()
                if event is h11.NEED_DATA:
                    chunk = sock.recv(65536)
                    assert chunk, f"the connection closed after {len(responses)} responses"
                    client.receive_data(chunk)
                elif isinstance(event, h11.Response):
                    headers = {k.decode(): v.decode() for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    body += bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    break
            responses.append((headers, body))
            data, _ = client.trailing_data
    return responses


@pytest.mark.parametrize("http", IMPLEMENTATIONS)
def test_a_pipelined_request_gets_an_id_of_its_own(http: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="chatstream_asgi")
    seen: list[str | None] = []
    cs = ChatStream(
        MockEngine(MockParams(type="echo")),
        session_secret="s",
        callback=lambda request, state: seen.append(current_request_id()),
    )
    with uvicorn_in_thread(create_app(cs), http) as url:
        port = int(url.rsplit(":", 1)[1])
        first, second = pipelined(port, request("one", {"x-request-id": "first-request"}), request("two", {}))
    assert first == ({**first[0], "x-request-id": "first-request"}, b"one")
    assert second[1] == b"two"
    own = second[0]["x-request-id"]
    assert own != "first-request" and re.fullmatch(r"[0-9a-f]{16}", own)
    assert seen == ["first-request", own]  # the callbacks ran under each request's own id
    completed = sorted(r.getMessage().split("]")[0] for r in caplog.records if "completed:" in r.getMessage())
    assert completed == sorted(["[first-request", f"[{own}"])
