"""The four completion states every accepted chat request ends in."""

from __future__ import annotations

from enum import Enum

__all__ = ["CompletionState"]


class CompletionState(str, Enum):
    """How a streamed reply ended; the values are the original library's exact strings."""

    SUCCESS = "success"
    """Every frame, including the final one, was sent."""
    CLIENT_DISCONNECTED_WHILE_STREAMING = "client_disconnected_while_streaming"
    """The client left (or stopped reading) after generated text had been sent."""
    CLIENT_DISCONNECTED_BEFORE_STREAMING = "client_disconnected_before_streaming"
    """The client left before any generated text was sent (queued, or during prefill)."""
    UNKNOWN_ERROR_OCCURRED = "unknown_error_occurred"
    """Anything else went wrong (engine failure, server shutdown, a bug)."""

    def __str__(self) -> str:
        return self.value
