"""Dialects: the JSON error bodies of each wire protocol, one object per protocol.

Every answer the package sends without a stream (a rejection, a 405, a 413, a 500 before the
stream started, the 503 of a server shutting down, a queue-full 429) takes its body from the
dialect of the endpoint that was asked: :data:`CHAT` for ``/chat_stream`` and the extra APIs,
``{"error": <code>, "detail": <text>}`` (the queue-full body is the original library's exact
``{"error": "too_many_requests"}``); :data:`OPENAI` for ``/v1/...``, OpenAI's
``{"error": {"message", "type", "param", "code"}}``. A new wire protocol is a new dialect here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from chatstream_asgi.protocols.openai import QUEUE_FULL_BODY, error_body

__all__ = ["CHAT", "OPENAI", "ChatDialect", "Dialect", "OpenAIDialect"]


@dataclass(frozen=True)
class Dialect:
    """The error bodies of one protocol. ``queue_full_status`` is the status of a queue-full answer."""

    queue_full_status: int = 429

    def error(self, status: int, code: str, detail: str) -> dict[str, Any]:
        """The body of an error answered with ``status``: ``code`` names it, ``detail`` explains it."""
        raise NotImplementedError

    def queue_full(self) -> dict[str, Any]:
        """The body of a queue-full answer (every slot busy, the queue at its limit)."""
        raise NotImplementedError

    def shutting_down(self) -> dict[str, Any]:
        """The body of the 503 a request gets while the server shuts down."""
        return self.error(503, "server_shutting_down", "the server is shutting down")


@dataclass(frozen=True)
class ChatDialect(Dialect):
    """``/chat_stream`` and the original library's extra APIs. ``queue_full_status=200`` is the original's
    ``too_many_request_as_http_error=False``."""

    def error(self, status: int, code: str, detail: str) -> dict[str, Any]:
        return {"error": code, "detail": detail}

    def queue_full(self) -> dict[str, Any]:
        return {"error": "too_many_requests"}


_OPENAI_TYPES = {401: "authentication_error", 429: "rate_limit_error"}


@dataclass(frozen=True)
class OpenAIDialect(Dialect):
    """OpenAI's API: the error type follows the status (4xx ``invalid_request_error``, 5xx ``server_error``)."""

    def error(self, status: int, code: str, detail: str) -> dict[str, Any]:
        kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        return error_body(detail, kind, code)

    def queue_full(self) -> dict[str, Any]:
        return QUEUE_FULL_BODY


CHAT = ChatDialect()
OPENAI = OpenAIDialect()
