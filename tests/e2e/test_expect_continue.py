"""``Expect: 100-continue`` with header auth outside ``ChatStreamMiddleware``, under each real server.

README says which servers let a refused client skip uploading its body: those that send ``100 Continue``
only when the app first calls ``receive()`` (uvicorn, granian). hypercorn answers ``100 Continue`` before
the app runs, so its client uploads the body and is refused after. If a server changes, this test and
README's "Where auth goes" must change together.
"""

from __future__ import annotations

import json
import socket

import pytest
from servers import SERVERS, running

BODY = json.dumps({"user_input": "hello there"}).encode()
SENDS_100_BEFORE_THE_APP = {"hypercorn": True, "uvicorn": False, "granian": False}


def _status_lines(port: int, headers: str, send_body: bool) -> list[str]:
    """Send the request head with ``Expect: 100-continue``; the status lines of what comes back."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            f"POST /chat_stream HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(BODY)}\r\nExpect: 100-continue\r\n{headers}\r\n".encode()
        )
        received = b""
        while not any(f" {code} ".encode() in received for code in (200, 401)):
            if send_body and b" 100 " in received:
                sock.sendall(BODY)
                send_body = False
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    return [line for line in received.decode(errors="replace").split("\r\n") if line.startswith("HTTP/1.1 ")]


@pytest.mark.parametrize("server", SERVERS)
def test_refused_before_upload_where_the_server_leaves_100_continue_to_the_app(server: str) -> None:
    with running(server, "auth_app:app") as live:
        refused = _status_lines(live.port, "", send_body=False)
        accepted = _status_lines(live.port, "Authorization: Bearer s3cret\r\n", send_body=True)
    codes = [line.split()[1] for line in refused]
    assert codes == (["100", "401"] if SENDS_100_BEFORE_THE_APP[server] else ["401"])
    assert [line.split()[1] for line in accepted] == ["100", "200"]  # with auth, the body is asked for and served
