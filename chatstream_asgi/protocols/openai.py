"""OpenAI's Chat Completions API on the wire: request parsing and error shapes (replies: ``openai_framing.py``).

Close enough that the official ``openai`` client works unchanged. Mapped parameters: ``messages``
(string content or text parts; ``developer`` counts as ``system``; ``assistant`` messages with
``tool_calls`` and ``tool`` results), ``temperature``, ``top_p``, ``max_tokens`` /
``max_completion_tokens``, ``stop``, ``seed``, ``stream``, ``stream_options.include_usage``,
``response_format`` (``protocols/structured.py``), ``tools`` / ``tool_choice`` (``protocols/tools.py``),
``logprobs`` / ``top_logprobs`` (at most 20), and the extensions ``top_k`` and ``repetition_penalty``.
``n`` must be 1; other OpenAI parameters are accepted and ignored.

Errors: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from chatstream_asgi.engines.base import ChatMessage
from chatstream_asgi.protocols.chat import InvalidRequest, load_json_object, parse_priority, validate_params
from chatstream_asgi.protocols.openai_framing import OpenAIChunkFramer, OpenAICompletionFramer, error_body
from chatstream_asgi.protocols.structured import FormatError, response_format_schema
from chatstream_asgi.protocols.tools import ToolRequest, parse_tools

__all__ = [
    "MAX_TOP_LOGPROBS",
    "QUEUE_FULL_BODY",
    "ChatCompletionRequest",
    "OpenAIChunkFramer",
    "OpenAICompletionFramer",
    "OpenAIError",
    "error_body",
    "parse_chat_completion",
]

MAX_TOP_LOGPROBS = 20

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
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


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


def _tool_calls(value: Any, i: int) -> list[dict[str, Any]]:
    """An assistant message's earlier calls, each call's ``arguments`` as an object (what templates expect)."""
    where = f"messages[{i}].tool_calls"
    if not isinstance(value, list):
        raise OpenAIError(f"{where} must be a list", param="messages")
    calls = []
    for call in value:
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise OpenAIError(f"{where}[] must be a function call with a name", param="messages")
        arguments = function.get("arguments") or "{}"
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except ValueError:
            arguments = None
        if not isinstance(arguments, Mapping):
            raise OpenAIError(f"{where}[].function.arguments must be a JSON object (as text)", param="messages")
        named = {"name": function["name"], "arguments": arguments}
        calls.append({"id": call.get("id"), "type": "function", "function": named})
    return calls


def _message(item: Any, i: int, names: dict[str, str]) -> ChatMessage:
    if not isinstance(item, Mapping):
        raise OpenAIError(f"messages[{i}] must be an object", param="messages")
    role = item.get("role")
    role = _ROLES.get(role) if isinstance(role, str) else None
    if role is None:
        raise OpenAIError(f"messages[{i}].role must be one of {sorted(_ROLES)}", param="messages")
    calls = item.get("tool_calls") if role == "assistant" else None
    content = "" if calls and item.get("content") is None else _content(item.get("content"), i)
    message: ChatMessage = {"role": role, "content": content}
    if calls:
        message["tool_calls"] = _tool_calls(calls, i)
        names.update((c["id"], c["function"]["name"]) for c in message["tool_calls"] if isinstance(c["id"], str))
    if role == "tool":
        call_id = item.get("tool_call_id")
        if not isinstance(call_id, str):
            raise OpenAIError(f"messages[{i}].tool_call_id must be a string", param="messages")
        message["tool_call_id"] = call_id
        if call_id in names:
            message["name"] = names[call_id]
    return message


def _messages(value: Any) -> list[ChatMessage]:
    if not isinstance(value, list) or not value:
        raise OpenAIError("messages must be a non-empty list", param="messages")
    names: dict[str, str] = {}  # call id -> function name, for the tool messages that answer them
    return [_message(item, i, names) for i, item in enumerate(value)]


def _logprobs(data: Mapping[str, Any]) -> int | None:
    """How many alternatives each token's log-probability comes with; None: no log-probabilities."""
    wanted, top = data.get("logprobs"), data.get("top_logprobs")
    if wanted not in (None, True, False):
        raise OpenAIError("logprobs must be a boolean", param="logprobs")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS):
        raise OpenAIError(f"top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}", param="top_logprobs")
    if not wanted:
        if top:
            raise OpenAIError("top_logprobs needs logprobs: true", param="top_logprobs")
        return None
    return top or 0


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
    json_schema: str | None = None
    """What ``response_format`` constrains the reply to (JSON Schema text); None: free text."""
    logprobs: int | None = None
    """``top_logprobs`` when ``logprobs`` is true; None when it is not."""
    tools: ToolRequest | None = None
    priority: int = 0
    """Lower is served first, among the requests of the same tenant (vLLM's ``priority``)."""


def parse_chat_completion(body: bytes) -> ChatCompletionRequest:
    """Parse and validate a chat completion body; :class:`OpenAIError` says what is wrong."""
    try:
        data = load_json_object(body)
    except InvalidRequest as exc:
        raise OpenAIError(exc.detail) from None
    if not isinstance(data.get("model", ""), str):
        raise OpenAIError("model must be a string", param="model")
    if data.get("n") not in (None, 1) or isinstance(data.get("n"), bool | float):  # True == 1.0 == 1
        raise OpenAIError("only n=1 is supported", param="n")
    stream = data.get("stream") or False
    if not isinstance(stream, bool):
        raise OpenAIError("stream must be a boolean", param="stream")
    options = data.get("stream_options") or {}
    if not isinstance(options, Mapping) or not isinstance(options.get("include_usage", False), bool):
        raise OpenAIError("stream_options.include_usage must be a boolean", param="stream_options")
    messages = _messages(data.get("messages"))
    request = ChatCompletionRequest(messages, _overrides(data), stream, bool(options.get("include_usage", False)))
    request.logprobs = _logprobs(data)
    try:
        request.priority = parse_priority(data.get("priority"))
    except InvalidRequest as exc:
        raise OpenAIError(exc.detail, param="priority") from None
    try:
        request.json_schema = response_format_schema(data.get("response_format"))
        request.tools = parse_tools(data)
    except FormatError as exc:
        raise OpenAIError(exc.message, param=exc.param, code=exc.code) from None
    if request.tools is not None and request.json_schema is not None:
        raise OpenAIError("send either tools or a JSON response_format, not both", param="response_format")
    return request
