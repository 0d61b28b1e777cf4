"""A raw HTTP/1.1 client over asyncio sockets, for tests that leave at exact moments.

``chat_request`` builds the bytes of a ``POST /chat_stream``; :class:`Response` reads a response
frame by frame (chunked or with a Content-Length) and parses ``text`` and ``sse`` streams, so a
test can stop after any frame and close (or abort) the connection.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any


def chat_request(rid: str, body: dict[str, Any], path: str = "/chat_stream") -> tuple[bytes, bytes]:
    """The head and body of a chat request with request id ``rid``."""
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Request-Id: {rid}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode()
    return head, data


class Response:
    """What a client read of one response: status, headers, frames, the text, whether it ended."""

    def __init__(self, reader: asyncio.StreamReader, fmt: str) -> None:
        self.reader = reader
        self.fmt = fmt
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.body = b""
        self.text = ""
        self.queue_events = 0
        self.deltas = 0
        """Text frames: chunks of a ``text`` stream, ``delta`` events of an ``sse`` one."""
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.ended = False
        """The final (terminating) chunk arrived."""
        self._sse = b""

    async def read_head(self) -> None:
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}

    async def frames(self) -> AsyncIterator[bytes]:
        """Each body chunk as it arrives (a whole body with a Content-Length); sets :attr:`ended`."""
        if "content-length" in self.headers:
            data = await self.reader.readexactly(int(self.headers["content-length"]))
            self._take(data)
            self.ended = True
            yield data
            return
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")
                self.ended = True
                return
            data = (await self.reader.readexactly(size + 2))[:-2]
            self._take(data)
            yield data

    async def read_all(self) -> None:
        async for _ in self.frames():
            pass

    def json(self) -> Any:
        return json.loads(self.body)

    def _take(self, data: bytes) -> None:
        self.body += data
        if self.status != 200:
            return
        if self.fmt == "text":
            self.text += data.decode()
            self.deltas += 1
            return
        self._sse += data
        *blocks, self._sse = self._sse.split(b"\n\n")
        for block in blocks:
            fields = dict(line.split(": ", 1) for line in block.decode().split("\n"))
            event, data_ = fields["event"], json.loads(fields["data"])
            self.events.append((event, data_))
            if event == "delta":
                self.text += data_["text"]
                self.deltas += 1
            elif event == "queue":
                self.queue_events += 1


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)
