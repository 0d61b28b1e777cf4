"""Stream formats: how deltas, queue updates, the end and errors are framed on the wire.

=============  ===========================  ==============================================
format         media type                   frames
=============  ===========================  ==============================================
``text``       ``text/plain``               plain UTF-8 deltas; an error appends
                                            ``<::ERROR::>{"error": ...}``
``chatstream`` ``text/plain``               the original's: the whole reply so far followed
                                            by ``<::EOS::>`` per chunk; an error chunk is
                                            ``<::ERROR::>{"error": ...}<::EOS::>``
``sse``        ``text/event-stream``        ``event: queue|delta|done|error`` with JSON data
``ndjson``     ``application/x-ndjson``     one JSON object a line, with a ``type`` key
=============  ===========================  ==============================================
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar

from chatstream_asgi.engines.base import TokenLogprob

__all__ = ["EOS_MARKER", "ERROR_MARKER", "FORMATS", "Framer", "Summary"]

EOS_MARKER = "<::EOS::>"
ERROR_MARKER = "<::ERROR::>"


@dataclass
class Summary:
    """What the final frame reports."""

    message_id: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "state": "success",
            "message_id": self.message_id,
            "finish_reason": self.finish_reason,
            "usage": {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
            },
        }


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


class Framer:
    """Frames one reply. A new framer is made per request (some formats keep state)."""

    name: ClassVar[str] = "text"
    media_type: ClassVar[str] = "text/plain; charset=utf-8"
    queue_events: ClassVar[bool] = False

    def delta(self, text: str) -> bytes:
        """The frame for a text delta; ``b""`` holds it back (nothing is sent)."""
        return text.encode()

    def logprobs(self, entries: list[TokenLogprob]) -> None:
        """The log-probabilities of the tokens behind the next delta (or the final frame); only framers whose
        protocol reports them keep them."""

    def queue(self, position: int, estimated_wait: float | None) -> bytes:
        raise NotImplementedError  # only framers with queue_events = True

    def final(self, summary: Summary) -> bytes:
        return b""

    def error(self, error: str, detail: str) -> bytes:
        """The error frame that ends a stream already under way (before it started, the
        :mod:`~chatstream_asgi.protocols.dialect` gives the JSON error instead)."""
        return (ERROR_MARKER + _dumps({"error": error, "detail": detail})).encode()


class ChatStreamFramer(Framer):
    """The original library's framing: every chunk is the reply so far plus ``<::EOS::>``."""

    name = "chatstream"

    def __init__(self) -> None:
        self._parts: list[str] = []

    def delta(self, text: str) -> bytes:
        self._parts.append(text)
        return ("".join(self._parts) + EOS_MARKER).encode()

    def error(self, error: str, detail: str) -> bytes:
        return super().error(error, detail) + EOS_MARKER.encode()


class SSEFramer(Framer):
    """Server-sent events with JSON data: ``queue``, ``delta``, ``done`` and ``error`` events."""

    name = "sse"
    media_type = "text/event-stream; charset=utf-8"
    queue_events = True

    @staticmethod
    def _event(event: str, data: dict[str, Any]) -> bytes:
        return f"event: {event}\ndata: {_dumps(data)}\n\n".encode()

    def delta(self, text: str) -> bytes:
        return self._event("delta", {"text": text})

    def queue(self, position: int, estimated_wait: float | None) -> bytes:
        return self._event("queue", {"position": position, "estimated_wait_seconds": estimated_wait})

    def final(self, summary: Summary) -> bytes:
        return self._event("done", summary.as_dict())

    def error(self, error: str, detail: str) -> bytes:
        return self._event("error", {"state": "unknown_error_occurred", "error": error, "detail": detail})


class NDJSONFramer(Framer):
    """Newline-delimited JSON objects with a ``type`` of queue, delta, done or error."""

    name = "ndjson"
    media_type = "application/x-ndjson"
    queue_events = True

    @staticmethod
    def _line(data: dict[str, Any]) -> bytes:
        return (_dumps(data) + "\n").encode()

    def delta(self, text: str) -> bytes:
        return self._line({"type": "delta", "text": text})

    def queue(self, position: int, estimated_wait: float | None) -> bytes:
        return self._line({"type": "queue", "position": position, "estimated_wait_seconds": estimated_wait})

    def final(self, summary: Summary) -> bytes:
        return self._line({"type": "done", **summary.as_dict()})

    def error(self, error: str, detail: str) -> bytes:
        return self._line({"type": "error", "state": "unknown_error_occurred", "error": error, "detail": detail})


FORMATS: dict[str, type[Framer]] = {f.name: f for f in (Framer, ChatStreamFramer, SSEFramer, NDJSONFramer)}
"""Stream format name → framer class."""
