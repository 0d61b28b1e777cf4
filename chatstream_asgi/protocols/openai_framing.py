"""OpenAI's Chat Completions replies on the wire: ``chat.completion.chunk`` events and the one ``chat.completion``.

- ``stream: true`` (:class:`OpenAIChunkFramer`): server-sent events, ``chat.completion.chunk`` objects,
  then ``data: [DONE]``. While the request waits for a slot, SSE comments
  ``: queue {"position", "estimated_wait_seconds"}`` (ignored by clients) report its place in the queue.
- ``stream: false`` (:class:`OpenAICompletionFramer`): one ``chat.completion`` object with ``usage``.
- With tools, a :class:`~chatstream_asgi.protocols.tool_calls.ToolCallParser` turns the text into
  ``content`` and ``tool_calls`` (streamed as ``delta.tool_calls``); a reply with calls ends with
  ``finish_reason: "tool_calls"``.
- With ``logprobs``, each chunk's ``choices[0].logprobs.content`` lists the tokens behind its delta
  (``token``, ``logprob``, ``bytes``, ``top_logprobs``); the non-streamed reply lists them all.
- A failure mid-stream sends one ``data: {"error": ...}`` event and ends the stream without ``[DONE]``.
"""

from __future__ import annotations

import json
from typing import Any

from chatstream_asgi.engines.base import TokenLogprob
from chatstream_asgi.protocols.framing import Framer, Summary
from chatstream_asgi.protocols.tool_calls import CallDelta, ContentDelta, ToolCallParser

__all__ = ["OpenAIChunkFramer", "OpenAICompletionFramer", "error_body"]

_FINISH_REASONS = {"stop": "stop", "length": "length"}


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """An error in OpenAI's shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _usage(summary: Summary) -> dict[str, int]:
    return {
        "prompt_tokens": summary.prompt_tokens,
        "completion_tokens": summary.completion_tokens,
        "total_tokens": summary.prompt_tokens + summary.completion_tokens,
    }


def _logprob(entry: TokenLogprob) -> dict[str, Any]:
    top = [{"token": t.token, "logprob": t.logprob, "bytes": list(t.raw)} for t in entry.top]
    return {"token": entry.token, "logprob": entry.logprob, "bytes": list(entry.raw), "top_logprobs": top}


class _OpenAIFramer(Framer):
    def __init__(
        self,
        completion_id: str,
        model: str,
        created: int,
        *,
        tools: ToolCallParser | None = None,
        logprobs: bool = False,
    ) -> None:
        self.completion_id = completion_id
        self.model = model
        self.created = created
        self.tools = tools
        self.wants_logprobs = logprobs
        self._logprobs: list[TokenLogprob] = []

    def logprobs(self, entries: list[TokenLogprob]) -> None:
        self._logprobs.extend(entries)

    def _take_logprobs(self) -> dict[str, Any] | None:
        if not self.wants_logprobs:
            return None
        entries, self._logprobs = self._logprobs, []
        return {"content": [_logprob(e) for e in entries], "refusal": None}

    def _finish_reason(self, summary: Summary) -> str:
        if self.tools is not None and self.tools.calls and summary.finish_reason == "stop":
            return "tool_calls"
        return _FINISH_REASONS.get(summary.finish_reason or "", "stop")

    def error(self, error: str, detail: str) -> bytes:
        return f"data: {_dumps(error_body(detail, 'server_error', error))}\n\n".encode()


class OpenAIChunkFramer(_OpenAIFramer):
    """``stream: true``: ``chat.completion.chunk`` events, then ``data: [DONE]``."""

    name = "openai"
    media_type = "text/event-stream; charset=utf-8"
    queue_events = True

    def __init__(self, completion_id: str, model: str, created: int, *, include_usage: bool = False, **kw: Any) -> None:
        super().__init__(completion_id, model, created, **kw)
        self.include_usage = include_usage
        self._role_sent = False

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        chunk = {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = None
        chunk.update(extra)
        return f"data: {_dumps(chunk)}\n\n".encode()

    def _delta(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        if not self._role_sent:
            self._role_sent = True
            delta = {"role": "assistant", **delta}
        choice = {"index": 0, "delta": delta, "logprobs": self._take_logprobs(), "finish_reason": finish_reason}
        return self._chunk([choice])

    def _frames(self, pieces: list[Any]) -> bytes:
        frames = b""
        for piece in pieces:
            if isinstance(piece, ContentDelta):
                frames += self._delta({"content": piece.text})
            elif isinstance(piece, CallDelta):
                frames += self._delta({"tool_calls": [piece.as_dict()]})
        return frames

    def delta(self, text: str) -> bytes:
        if self.tools is None:
            return self._delta({"content": text})
        return self._frames(self.tools.feed(text))  # b"": held back, its log-probabilities with it

    def queue(self, position: int, estimated_wait: float | None) -> bytes:
        return f": queue {_dumps({'position': position, 'estimated_wait_seconds': estimated_wait})}\n\n".encode()

    def final(self, summary: Summary) -> bytes:
        frames = self._frames(self.tools.finish()) if self.tools is not None else b""
        frames += self._delta({}, self._finish_reason(summary))
        if self.include_usage:
            frames += self._chunk([], usage=_usage(summary))
        return frames + b"data: [DONE]\n\n"


class OpenAICompletionFramer(_OpenAIFramer):
    """``stream: false``: holds every delta back and sends one ``chat.completion`` at the end."""

    name = "openai-completion"
    media_type = "application/json"

    def __init__(self, completion_id: str, model: str, created: int, **kw: Any) -> None:
        super().__init__(completion_id, model, created, **kw)
        self._parts: list[str] = []

    def delta(self, text: str) -> bytes:
        self._parts.append(text)
        return b""

    def final(self, summary: Summary) -> bytes:
        content: str | None = "".join(self._parts)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if self.tools is not None:
            pieces = [*self.tools.feed(content or ""), *self.tools.finish()]
            content = "".join(p.text for p in pieces if isinstance(p, ContentDelta))
            if self.tools.calls:
                message = {"role": "assistant", "content": content.strip() or None}
                message["tool_calls"] = [call.as_dict() for call in self.tools.calls]
            else:
                message["content"] = content
        completion = {
            "id": self.completion_id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": self._take_logprobs(),
                    "finish_reason": self._finish_reason(summary),
                }
            ],
            "usage": _usage(summary),
        }
        return _dumps(completion).encode()
