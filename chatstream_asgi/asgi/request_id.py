"""The request id on the wire: bound per request, echoed on every response, by one ``send`` wrapper.

As asgi-correlation-id does: :func:`request_id_scope` binds the request's id
(:func:`~chatstream_asgi.logs.bind_request_id`) and gives back a ``send`` that adds the id header to
the response start, whatever answers (a chat reply, a JSON error, ``/metrics``, a 405 or a 401). No
response is given the header by hand. A response that already carries it (an endpoint-mode response
under the middleware, which bound the same id) keeps its own, so the header is never doubled.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from chatstream_asgi.logs import DEFAULT_REQUEST_ID_HEADER, bind_request_id
from chatstream_asgi.types import ASGIApp, ASGIMessage, Receive, Scope, Send

__all__ = ["RequestIdMiddleware", "echo_header", "request_id_scope"]


def echo_header(send: Send, name: str, value: str) -> Send:
    """``send`` with ``name: value`` added to the response start (unless the response has that header)."""
    key = name.lower().encode("latin-1")
    pair = (key, value.encode("latin-1"))

    async def echoing(message: ASGIMessage) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", ()))
            if not any(header.lower() == key for header, _ in headers):
                message = {**message, "headers": [*headers, pair]}
        await send(message)

    return echoing


@contextmanager
def request_id_scope(
    scope: Scope, send: Send, header: str = DEFAULT_REQUEST_ID_HEADER, *, echo: bool = True
) -> Iterator[Send]:
    """Bind the request id of ``scope`` for the block; yields the ``send`` to answer with (echoing the id
    unless ``echo`` is False: a proxy in front sets the header itself)."""
    with bind_request_id(scope, header) as request_id:
        yield echo_header(send, header, request_id) if echo else send


class RequestIdMiddleware:
    """Binds and echoes the request id of every HTTP request to ``app`` (the CLI app's page and its 404s)."""

    def __init__(self, app: ASGIApp, header: str = DEFAULT_REQUEST_ID_HEADER, *, echo: bool = True) -> None:
        self.app = app
        self.header = header
        self.echo = echo

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with request_id_scope(scope, send, self.header, echo=self.echo) as send:
            await self.app(scope, receive, send)
