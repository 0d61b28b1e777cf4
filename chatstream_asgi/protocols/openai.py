"""OpenAI's Chat Completions API on the wire: request parsing, stream framers and error shapes.

Close enough that the official ``openai`` client works unchanged. Mapped parameters: ``messages``
(string content or text parts; ``developer`` counts as ``system``), ``temperature``, ``top_p``,
``max_tokens`` / ``max_completion_tokens``, ``stop``, ``seed``, ``stream``,
``stream_options.include_usage``, and the extensions ``top_k`` and ``repetition_penalty``. ``n``
must be 1; other OpenAI parameters are accepted and ignored.

- ``stream: false`` → one ``chat.completion`` object with ``usage``.
- ``stream: true`` → server-sent events: ``chat.completion.chunk`` objects, then ``data: [DONE]``.
  While the request waits for a slot, SSE comments ``: queue {"position", "estimated_wait_seconds"}``
  (ignored by clients) report its place in the queue.
- Errors: ``{"error": {"message", "type", "param", "code"}}``; a failure mid-stream sends one
  ``data: {"error": ...}`` event and ends the stream without ``[DONE]``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from chatstream_asgi.engines.base import ChatMessage
from chatstream_asgi.protocols.chat import InvalidRequest, load_json_object, parse_priority, validate_params
from chatstream_asgi.protocols.framing import Framer, Summary

__all__ = [
    "QUEUE_FULL_BODY",
    "ChatCompletionRequest",
    "OpenAIChunkFramer",
    "OpenAICompletionFramer",
    "OpenAIError",
    "error_body",
    "parse_chat_completion",
]


_PARAMS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "repetition_penalty": "repetition_penalty",
    "seed": "seed",
    "stop": "stop",
    "max_tokens": "max_new_tokens",
    "max_completion_tokens": "max_new_tokens",
}
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_FINISH_REASONS = {"stop": "stop", "length": "length"}


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """An error in OpenAI's shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


QUEUE_FULL_BODY = error_body(
    "too many requests: every generation slot is busy and the wait queue is full",
    "rate_limit_error",
    "too_many_requests",
)


class OpenAIError(Exception):
    """A request OpenAI's API would reject with ``status``."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = "invalid_request") -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, "invalid_request_error", self.code, self.param)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _usage(summary: Summary) -> dict[str, int]:
    return {
        "prompt_tokens": summary.prompt_tokens,
        "completion_tokens": summary.completion_tokens,
        "total_tokens": summary.prompt_tokens + summary.completion_tokens,
    }


class _OpenAIFramer(Framer):
    def __init__(self, completion_id: str, model: str, created: int) -> None:
        self.completion_id = completion_id
        self.model = model
        self.created = created

    def error(self, error: str, detail: str) -> bytes:
        return f"data: {_dumps(error_body(detail, 'server_error', error))}\n\n".encode()


class OpenAIChunkFramer(_OpenAIFramer):
    """``stream: true``: ``chat.completion.chunk`` events, then ``data: [DONE]``."""

    name = "openai"
    media_type = "text/event-stream; charset=utf-8"
    queue_events = True

    def __init__(self, completion_id: str, model: str, created: int, *, include_usage: bool = False) -> None:
        super().__init__(completion_id, model, created)
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

    def _delta(self, content: str | None, finish_reason: str | None) -> bytes:
        delta: dict[str, Any] = {} if content is None else {"content": content}
        if not self._role_sent:
            self._role_sent = True
            delta = {"role": "assistant", **delta}
        return self._chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}])

    def delta(self, text: str) -> bytes:
        return self._delta(text, None)

    def queue(self, position: int, estimated_wait: float | None) -> bytes:
        return f": queue {_dumps({'position': position, 'estimated_wait_seconds': estimated_wait})}\n\n".encode()

    def final(self, summary: Summary) -> bytes:
        frames = self._delta(None, _FINISH_REASONS.get(summary.finish_reason or "", "stop"))
        if self.include_usage:
            frames += self._chunk([], usage=_usage(summary))
        return frames + b"data: [DONE]\n\n"


class OpenAICompletionFramer(_OpenAIFramer):
    """``stream: false``: holds every delta back and sends one ``chat.completion`` at the end."""

    name = "openai-completion"
    media_type = "application/json"

    def __init__(self, completion_id: str, model: str, created: int) -> None:
        super().__init__(completion_id, model, created)
        self._parts: list[str] = []

    def delta(self, text: str) -> bytes:
        self._parts.append(text)
        return b""

    def final(self, summary: Summary) -> bytes:
        completion = {
            "id": self.completion_id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(self._parts)},
                    "logprobs": None,
                    "finish_reason": _FINISH_REASONS.get(summary.finish_reason or "", "stop"),
                }
            ],
            "usage": _usage(summary),
        }
        return _dumps(completion).encode()


def _content(value: Any, i: int) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for part in value:
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise OpenAIError(f"messages[{i}].content: only text parts are supported", param="messages")
            texts.append(part["text"])
        return "".join(texts)
    raise OpenAIError(f"messages[{i}].content must be a string or a list of text parts", param="messages")


def _messages(value: Any) -> list[ChatMessage]:
    if not isinstance(value, list) or not value:
        raise OpenAIError("messages must be a non-empty list", param="messages")
    out: list[ChatMessage] = []
    for i, item in enumerate(value):
        if not isinstance(item, Mapping):
            raise OpenAIError(f"messages[{i}] must be an object", param="messages")
        role = item.get("role")
        role = _ROLES.get(role) if isinstance(role, str) else None
        if role is None:
            raise OpenAIError(f"messages[{i}].role must be one of {sorted(_ROLES)}", param="messages")
        out.append({"role": role, "content": _content(item.get("content"), i)})
    return out


def _overrides(data: Mapping[str, Any]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for name, target in _PARAMS.items():
        if data.get(name) is None:
            continue
        try:
            overrides.update(validate_params({target: data[name]}))
        except InvalidRequest as exc:
            raise OpenAIError(exc.detail.replace(f"generation_params.{target}", name), param=name) from None
    return overrides


@dataclass
class ChatCompletionRequest:
    """A validated ``/v1/chat/completions`` body."""

    messages: list[ChatMessage]
    overrides: dict[str, Any] = field(default_factory=dict)
    """Generation parameters under this package's names (``max_tokens`` is ``max_new_tokens``)."""
    stream: bool = False
    include_usage: bool = False
    priority: int = 0


def parse_chat_completion(body: bytes) -> ChatCompletionRequest:
    """Parse and validate a chat completion body; :class:`OpenAIError` says what is wrong."""
    try:
        data = load_json_object(body)
    except InvalidRequest as exc:
        raise OpenAIError(exc.detail) from None
    if not isinstance(data.get("model", ""), str):
        raise OpenAIError("model must be a string", param="model")
    if data.get("n") not in (None, 1):
        raise OpenAIError("only n=1 is supported", param="n")
    stream = data.get("stream") or False
    if not isinstance(stream, bool):
        raise OpenAIError("stream must be a boolean", param="stream")
    options = data.get("stream_options") or {}
    if not isinstance(options, Mapping) or not isinstance(options.get("include_usage", False), bool):
        raise OpenAIError("stream_options.include_usage must be a boolean", param="stream_options")
    messages = _messages(data.get("messages"))
    try:
        priority = parse_priority(data.get("priority"))
    except InvalidRequest as exc:
        raise OpenAIError(exc.detail, param="priority") from None
    overrides = _overrides(data)
    return ChatCompletionRequest(messages, overrides, stream, bool(options.get("include_usage", False)), priority)
