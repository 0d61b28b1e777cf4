"""Request-body buffering and a replaying ``receive``.

:func:`read_body` buffers a request body under a size limit. :class:`SharedReceive` makes the
server's ``receive`` safe for several readers: one upstream read at a time, its result handed to
whoever asked, and ``http.disconnect`` sticky, since hypercorn reports it only once and granian
wakes only one waiter. :class:`ReplayReceive` hands the buffered body once to each reader, then
passes through to the :class:`SharedReceive`.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from types import FrameType

from starlette.requests import ClientDisconnect, Request

from chatstream_asgi.logs import logger
from chatstream_asgi.types import ASGIMessage, Receive, Scope

__all__ = [
    "BodyTooLarge",
    "ClientDisconnected",
    "ReplayReceive",
    "SharedReceive",
    "read_body",
    "read_request_body",
    "replay_request",
    "shared_for",
    "shared_of",
    "watched_receive",
]


DISCONNECT: ASGIMessage = {"type": "http.disconnect"}


class BodyTooLarge(Exception):
    """The body (declared or received) is over the limit."""


class ClientDisconnected(Exception):
    """The client left before the whole body arrived; ``body`` holds what did."""

    def __init__(self, body: bytes) -> None:
        super().__init__("client disconnected while sending the request body")
        self.body = body


def content_length(scope: ASGIMessage) -> int | None:
    """The declared Content-Length, or None when absent or malformed."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def read_body(scope: ASGIMessage, receive: Receive, max_size: int) -> bytes:
    """Read the whole body. Raises :class:`BodyTooLarge` or :class:`ClientDisconnected`.

    A ``receive`` that raises is a client that left too: Ray Serve's proxy raises ``TaskCancelledError``
    from it when the client goes mid-body, often before it cancels the request's task.
    """
    declared = content_length(scope)
    if declared is not None and declared > max_size:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            message = await receive()
        except Exception as exc:
            logger.info("receive failed while the body was read (%r): treated as a disconnect", exc)
            raise ClientDisconnected(b"".join(chunks)) from exc
        if message["type"] == "http.disconnect":
            raise ClientDisconnected(b"".join(chunks))
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > max_size:
                raise BodyTooLarge
            chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def read_request_body(request: Request, max_size: int) -> bytes:
    """A Starlette request's body, at most ``max_size`` bytes (:class:`BodyTooLarge` otherwise): refused on
    its Content-Length when that says too much, else counted as it arrives (chunked or lying). A
    ``receive`` that raises is a client that left (Starlette's ``ClientDisconnect``), as in :func:`read_body`."""
    declared = content_length(request.scope)
    if declared is not None and declared > max_size:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():  # a body the endpoint already read comes back from its cache
            size += len(chunk)
            if size > max_size:
                raise BodyTooLarge
            chunks.append(chunk)
    except (BodyTooLarge, ClientDisconnect):
        raise
    except Exception as exc:
        logger.info("receive failed while the body was read (%r): treated as a disconnect", exc)
        raise ClientDisconnect from exc
    return b"".join(chunks)


class SharedReceive:
    """The server's ``receive`` shared by several readers, with a sticky disconnect."""

    __slots__ = ("_pending", "_receive", "disconnected")

    def __init__(self, receive: Receive, *, disconnected: bool = False) -> None:
        self._receive = receive
        self._pending: asyncio.Future[ASGIMessage] | None = None
        self.disconnected = disconnected

    async def __call__(self) -> ASGIMessage:
        if self.disconnected:
            return DISCONNECT
        pending = self._pending
        if pending is None:
            pending = self._pending = asyncio.ensure_future(self._receive())
        try:
            # A cancelled reader leaves the read running for the next one: no message is lost.
            message = await asyncio.shield(pending)
        except BaseException:
            if pending.done() and self._pending is pending:
                self._pending = None
            raise
        if self._pending is pending:
            self._pending = None
        if message["type"] == "http.disconnect":
            self.disconnected = True
        return message

    def close(self) -> None:
        """Cancel an upstream read still in flight (the request is over)."""
        if self._pending is not None and not self._pending.done():
            self._pending.cancel()
        self._pending = None


class ReplayReceive:
    """Hands the buffered body once to each reader, then passes through to the :class:`SharedReceive`.

    A *reader* is the coroutine that awaits ``receive()``: a Starlette ``Request`` reading its
    body, an auth middleware's read loop, Quart's message loop. Each one gets the whole body in one
    ``more_body=False`` message the first time it asks. When the same reader asks again (Quart
    keeps reading after the body; a disconnect watcher loops), it waits on the server for the
    disconnect instead of receiving the body twice. Once the response starts, every call passes
    through. ``max_replays`` bounds the copies handed out (a reader wrapped in a new coroutine per
    call cannot be told apart from a new reader).
    """

    __slots__ = ("_body_message", "_readers", "max_replays", "response_started", "shared")

    def __init__(self, body: bytes, shared: SharedReceive, *, max_replays: int = 8) -> None:
        self._body_message: ASGIMessage = {"type": "http.request", "body": body, "more_body": False}
        self.shared = shared
        self.response_started = False
        self.max_replays = max_replays
        # The frames that got the body: kept alive so that their ids cannot be reused.
        self._readers: list[FrameType] = []

    async def __call__(self) -> ASGIMessage:
        reader = sys._getframe(1)
        if (
            self.response_started
            or self.shared.disconnected
            or len(self._readers) >= self.max_replays
            or any(seen is reader for seen in self._readers)
        ):
            return await self.shared()
        self._readers.append(reader)
        return dict(self._body_message)


_shared: ContextVar[tuple[Scope, SharedReceive] | None] = ContextVar("chatstream_shared_receive", default=None)


@contextmanager
def shared_for(scope: Scope, shared: SharedReceive) -> Iterator[None]:
    """While the app below serves ``scope``, :func:`watched_receive` finds ``shared`` for it. Bound to the
    scope: a task started from inside this one for another request (a pipelined one) never gets it."""
    token = _shared.set((scope, shared))
    try:
        yield
    finally:
        _shared.reset(token)


def shared_of(scope: Scope) -> SharedReceive | None:
    """The :class:`SharedReceive` a middleware above replays ``scope``'s body from, if one does."""
    bound = _shared.get()
    return bound[1] if bound is not None and bound[0] is scope else None


def watched_receive(scope: Scope, receive: Receive) -> Receive:
    """What a send loop should watch for the client leaving: the middleware's :class:`SharedReceive` of
    this request when it replays the body (found whatever wraps ``receive`` on the way down: a
    ``BaseHTTPMiddleware`` does, and hands each call the replayed body again), else ``receive`` itself."""
    return shared_of(scope) or receive


def replay_request(scope: Scope, body: bytes, shared: SharedReceive) -> Request:
    """A Starlette :class:`~starlette.requests.Request` whose body reads replay ``body``: what
    callbacks are given, so that they can read the body again."""
    return Request(scope, ReplayReceive(body, shared))
