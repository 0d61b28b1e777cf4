"""The ASGI and callback types, defined once for the whole package."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from chatstream_asgi.states import CompletionState

if TYPE_CHECKING:
    from starlette.requests import Request

__all__ = [
    "ASGIApp",
    "ASGIMessage",
    "Callback",
    "FeedbackCallback",
    "Headers",
    "Receive",
    "Scope",
    "Send",
]

Scope = MutableMapping[str, Any]
ASGIMessage = MutableMapping[str, Any]
"""An ASGI event (``{"type": "http.request", ...}``); not a chat message."""
Receive = Callable[[], Awaitable[ASGIMessage]]
Send = Callable[[ASGIMessage], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]
"""Raw response headers, lower-case names."""

Callback = Callable[["Request", CompletionState], "Awaitable[None] | None"]
"""``callback(request, state)``, sync or async, called once when an accepted request ends."""
FeedbackCallback = Callable[["Request", str, "str | None"], "Awaitable[None] | None"]
"""``feedback_callback(request, message_id, feedback)``, sync or async; feedback is like, dislike or None."""
