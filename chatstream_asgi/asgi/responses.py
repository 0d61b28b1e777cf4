"""Small raw-ASGI responses: JSON errors and API results."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from chatstream_asgi.types import Send

__all__ = ["Send", "send_bytes", "send_json"]


async def send_bytes(
    send: Send,
    status: int,
    body: bytes,
    content_type: str,
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    """Send a complete response."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type.encode()),
                (b"content-length", str(len(body)).encode()),
                (b"x-content-type-options", b"nosniff"),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_json(send: Send, status: int, payload: Any, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    """Send ``payload`` as a JSON response (text that cannot be encoded is escaped, never a crash)."""
    body = json.dumps(payload, ensure_ascii=False).encode("utf-8", "backslashreplace")
    await send_bytes(send, status, body, "application/json", headers)
