"""The id of the request being served, and the package's logger that prints it on every line.

The middleware (or the endpoint-mode response) binds the id when a request arrives, as
asgi-correlation-id does: the client's id from the configured header when it is well-formed, else a
fresh one. Every line logged through :data:`logger` while the request is served then starts with
``[<request id>]`` (operators grep for it), without the id being handed from call to call. The id
lives in a :class:`~contextvars.ContextVar`, so concurrent requests on one event loop never see
each other's.

The binding belongs to one ASGI scope. A task inherits its creator's context: uvicorn starts a
pipelined HTTP/1.1 request from inside the previous request's task, so the new request's task begins
with the previous one's binding. :func:`bind_request_id` therefore keeps a bound id only for the
very scope it was bound for, and :func:`unbind_request_id` clears an inherited one.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from chatstream_asgi.types import Scope

__all__ = [
    "DEFAULT_REQUEST_ID_HEADER",
    "bind_request_id",
    "current_request_id",
    "escape",
    "logger",
    "request_logger",
    "unbind_request_id",
]

DEFAULT_REQUEST_ID_HEADER = "X-Request-Id"

_bound: ContextVar[tuple[Scope, str] | None] = ContextVar("chatstream_request_id", default=None)
"""The scope being served and its request id."""
_WELL_FORMED = re.compile(r"^[\w.:@/+=-]{1,128}$", re.ASCII)


def current_request_id() -> str | None:
    """The id of the request this task is serving (None outside one)."""
    bound = _bound.get()
    return bound[1] if bound is not None else None


def _from_headers(scope: Scope, header: bytes) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == header:
            candidate = value.decode("latin-1")
            return candidate if _WELL_FORMED.match(candidate) else None
    return None


@contextmanager
def bind_request_id(scope: Scope, header: str = DEFAULT_REQUEST_ID_HEADER) -> Iterator[str]:
    """Bind the id of the request of ``scope`` for the duration of the block. An id bound for this same
    scope (by a middleware above an endpoint) is kept; one bound for another scope (inherited from the
    task that started this one) never is."""
    bound = _bound.get()
    if bound is not None and bound[0] is scope:
        yield bound[1]
        return
    request_id = _from_headers(scope, header.lower().encode("latin-1")) or uuid.uuid4().hex[:16]
    token = _bound.set((scope, request_id))
    try:
        yield request_id
    finally:
        _bound.reset(token)


@contextmanager
def unbind_request_id(scope: Scope) -> Iterator[None]:
    """No request id for the duration of the block unless one is bound for ``scope`` itself: a request
    the package does not serve (a path passed through) must not log, or report to code that asks, an id
    inherited from another request."""
    bound = _bound.get()
    if bound is None or bound[0] is scope:
        yield
        return
    token = _bound.set(None)
    try:
        yield
    finally:
        _bound.reset(token)


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
_CONTROL.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t", 0x2028: "\\u2028", 0x2029: "\\u2029"})


def escape(text: str) -> str:
    """``text`` with line breaks and other control characters backslash-escaped, so that user
    text in a log line can never start a line of its own (or forge one)."""
    return text if text.isprintable() else text.translate(_CONTROL)


class _RequestLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Prefixes ``[<request id>]``, puts the id in the record's ``request_id`` attribute, and
    escapes every string argument (:func:`escape`): arguments are where user text goes."""

    def log(self, level: int, msg: Any, *args: Any, **kwargs: Any) -> None:
        super().log(level, msg, *(escape(a) if isinstance(a, str) else a for a in args), **kwargs)

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        request_id = current_request_id() or "-"
        kwargs.setdefault("extra", {})["request_id"] = request_id
        return f"[{request_id}] {msg}", kwargs


def request_logger(name: str) -> logging.LoggerAdapter[logging.Logger]:
    """A logger whose lines carry the current request id."""
    return _RequestLog(logging.getLogger(name), {})


logger = request_logger("chatstream_asgi")
"""The package's request-aware logger."""
