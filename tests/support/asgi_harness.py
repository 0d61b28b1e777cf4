"""A raw ASGI harness: scopes, a scripted ``receive`` and a recording ``send``.

``Receive`` hands out the request body and then waits until :meth:`Receive.disconnect` is called.
Its disconnect is *sticky* (uvicorn-like: every later call returns it again) or *one-shot*
(hypercorn-like: returned once, then ``receive`` blocks forever). ``Send`` records messages and
can raise ``OSError``, block (a client that stops reading) or fail if two sends overlap.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

import anyio

Message = MutableMapping[str, Any]
Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]

SPEC_VERSIONS = ("2.3", "2.4")


def http_scope(
    path: str = "/chat_stream",
    *,
    method: str = "POST",
    body: bytes | None = None,
    headers: Iterable[tuple[bytes, bytes]] = (),
    spec_version: str = "2.4",
    root_path: str = "",
    content_length: bool = True,
) -> Scope:
    """An HTTP scope; with ``content_length`` and a ``body`` it declares the body's length."""
    all_headers = [(b"host", b"testserver"), *headers]
    if body is not None and content_length:
        all_headers.append((b"content-length", str(len(body)).encode()))
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": spec_version},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": root_path,
        "query_string": b"",
        "headers": all_headers,
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
        "state": {},
    }


def chat_body(user_input: str = "hello there", **extra: Any) -> bytes:
    """A chat request body."""
    return json.dumps({"user_input": user_input, **extra}).encode()


class Receive:
    """The server side of ``receive``: body chunks, then a disconnect when told.

    ``chunks`` are sent as ``http.request`` messages (``more_body`` on all but the last); pass
    ``messages`` instead to script raw messages. ``sticky=False`` delivers the disconnect once.
    """

    def __init__(
        self,
        body: bytes | list[bytes] = b"",
        *,
        sticky: bool = True,
        messages: list[Message] | None = None,
    ) -> None:
        if messages is None:
            chunks = body if isinstance(body, list) else [body]
            messages = [
                {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1}
                for i, chunk in enumerate(chunks)
            ]
        self._messages = list(messages)
        self.sticky = sticky
        self.calls = 0
        self.disconnects_delivered = 0
        self._gone = anyio.Event()

    def disconnect(self) -> None:
        """The client leaves: a waiting or later ``receive`` returns ``http.disconnect``."""
        self._gone.set()

    async def __call__(self) -> Message:
        self.calls += 1
        if self._messages:
            return self._messages.pop(0)
        await self._gone.wait()
        if not self.sticky and self.disconnects_delivered:
            await anyio.sleep_forever()
        self.disconnects_delivered += 1
        return {"type": "http.disconnect"}


class ConcurrentSend(AssertionError):
    """Two ``send`` calls overlapped."""


class Send:
    """Records sent messages. ``raise_at``/``block_at`` make the n-th call (0-based) fail or hang.

    ``on_message(message, send)`` runs after a message is recorded (e.g. to disconnect the client
    right after the final frame). Every call yields once, so overlapping sends are detected.
    """

    def __init__(
        self,
        *,
        raise_at: int | None = None,
        block_at: int | None = None,
        on_message: Callable[[Message, Send], None] | None = None,
    ) -> None:
        self.messages: list[Message] = []
        self.raise_at = raise_at
        self.block_at = block_at
        self.on_message = on_message
        self.calls = 0
        self.overlaps = 0
        self._busy = False
        self._changed = anyio.Event()

    async def __call__(self, message: Message) -> None:
        if self._busy:
            self.overlaps += 1
            raise ConcurrentSend("send called while another send was in progress")
        self._busy = True
        try:
            index = self.calls
            self.calls += 1
            self._notify()
            await anyio.sleep(0)
            if index == self.raise_at:
                raise OSError("connection reset by peer")
            if index == self.block_at:
                await anyio.sleep_forever()
            self.messages.append(message)
        finally:
            self._busy = False
        if self.on_message is not None:
            self.on_message(message, self)
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_until(self, predicate: Callable[[Send], bool], timeout: float = 5.0) -> None:
        """Wait (bounded) until ``predicate(self)`` holds."""
        with anyio.fail_after(timeout):
            while not predicate(self):
                await self._changed.wait()

    @property
    def start(self) -> Message | None:
        return next((m for m in self.messages if m["type"] == "http.response.start"), None)

    @property
    def status(self) -> int | None:
        start = self.start
        return None if start is None else start["status"]

    @property
    def headers(self) -> dict[str, str]:
        start = self.start
        return {} if start is None else {k.decode(): v.decode() for k, v in start["headers"]}

    @property
    def bodies(self) -> list[bytes]:
        return [m.get("body", b"") for m in self.messages if m["type"] == "http.response.body"]

    @property
    def body(self) -> bytes:
        return b"".join(self.bodies)

    @property
    def text_frames(self) -> int:
        """Body messages with content."""
        return sum(1 for b in self.bodies if b)

    @property
    def complete(self) -> bool:
        """Whether the final ``more_body: False`` message was sent."""
        return any(m["type"] == "http.response.body" and not m.get("more_body", False) for m in self.messages)

    def json(self) -> Any:
        return json.loads(self.body)


async def not_found(scope: Scope, receive: Any, send: Any) -> None:
    """A bare downstream app: 404 for HTTP, completes lifespan."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send({"type": "http.response.start", "status": 404, "headers": []})
    await send({"type": "http.response.body", "body": b"not found"})


class StateLog:
    """A completion callback that records ``(state, reply)`` per call."""

    def __init__(self) -> None:
        self.states: list[str] = []
        self.replies: list[str] = []
        self._changed = anyio.Event()

    def __call__(self, request: Any, state: Any) -> None:
        from chatstream_asgi import get_result

        result = get_result(request)
        self.states.append(str(state))
        self.replies.append(result.reply if result is not None else "")
        self._changed.set()
        self._changed = anyio.Event()

    async def wait(self, count: int = 1, timeout: float = 5.0) -> list[str]:
        """Wait (bounded) for ``count`` callback calls."""
        with anyio.fail_after(timeout):
            while len(self.states) < count:
                await self._changed.wait()
        return self.states


async def read_whole_body(receive: Callable[[], Awaitable[Message]]) -> bytes:
    """Read ``http.request`` messages until ``more_body`` is false, as a body-reading middleware does."""
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)
