"""Tool calls out of a model's text, as it streams: content deltas and call deltas in OpenAI's order.

A parser is fed the reply's text deltas and returns what may be sent now: :class:`ContentDelta` (text
for ``delta.content``) and :class:`CallDelta` (a piece of ``delta.tool_calls[index]``: the first piece
carries the call's ``id`` and ``name``, every piece part of its ``arguments``). Text that may still turn
out to open a call is held back until it does or cannot. One parser per reply, per format:

- ``hermes`` (Qwen 2.5, Qwen 3, Hermes templates): calls are ``<tool_call>{"name": ..., "arguments":
  {...}}</tool_call>`` blocks; text around them is content.
- ``json`` (Llama 3.1 and 3.2 templates): the whole reply is a call ``{"name": ..., "parameters": {...}}``
  (``arguments`` also accepted; several separated by ``;``, an optional ``<|python_tag|>`` first), or
  it is content.
- ``call`` (``tool_choice: "required"``, decoding constrained to it): the reply is ``{"name": ...,
  "arguments": {...}}``.
- ``arguments`` (a named function, constrained): the reply is the function's arguments, streamed as
  they come.

A block that does not parse as a call is content, as the model wrote it.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

__all__ = ["CallDelta", "ContentDelta", "ToolCall", "ToolCallParser", "new_call_id", "parser_for"]


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class CallDelta:
    index: int
    arguments: str
    id: str | None = None
    name: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The ``delta.tool_calls[]`` item."""
        if self.id is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        function = {"name": self.name, "arguments": self.arguments}
        return {"index": self.index, "id": self.id, "type": "function", "function": function}


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str

    def as_dict(self) -> dict[str, Any]:
        """The ``message.tool_calls[]`` item."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def _held(text: str, marker: str) -> int:
    """How many trailing characters of ``text`` could begin ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _call(obj: Any, *keys: str) -> tuple[str, str] | None:
    """``(name, arguments as JSON text)`` of a call object, or None when ``obj`` is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    for key in keys:
        if key in obj:
            args = obj[key]
            if isinstance(args, str):  # some models write the arguments as a JSON string
                try:
                    args = json.loads(args)
                except ValueError:
                    return None
            return (obj["name"], json.dumps(args, ensure_ascii=False)) if isinstance(args, dict) else None
    return obj["name"], "{}"


class ToolCallParser:
    """Base: every delta is content. Subclasses hold text back and find calls."""

    def __init__(self) -> None:
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> list[Any]:
        """What may be sent for ``text`` (:class:`ContentDelta` / :class:`CallDelta` items)."""
        return [ContentDelta(text)] if text else []

    def finish(self) -> list[Any]:
        """What was held back, at the end of the reply."""
        return []

    def _add(self, name: str, arguments: str) -> CallDelta:
        call = ToolCall(new_call_id(), name, arguments)
        self.calls.append(call)
        return CallDelta(len(self.calls) - 1, arguments, call.id, name)


class HermesParser(ToolCallParser):
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self) -> None:
        super().__init__()
        self._buffer = ""
        self._in_call = False

    def feed(self, text: str) -> list[Any]:
        self._buffer += text
        out: list[Any] = []
        while True:
            marker = self.CLOSE if self._in_call else self.OPEN
            at = self._buffer.find(marker)
            if at < 0:
                break
            before, self._buffer = self._buffer[:at], self._buffer[at + len(marker) :]
            if self._in_call:
                out += self._block(before, closed=True)
            elif before:
                out.append(ContentDelta(before))
            self._in_call = not self._in_call
        if not self._in_call:
            keep = _held(self._buffer, self.OPEN)
            ready, self._buffer = self._buffer[: len(self._buffer) - keep], self._buffer[len(self._buffer) - keep :]
            if ready:
                out.append(ContentDelta(ready))
        return out

    def finish(self) -> list[Any]:
        rest, self._buffer = self._buffer, ""
        if self._in_call:
            return self._block(rest, closed=False)
        return [ContentDelta(rest)] if rest else []

    def _block(self, body: str, *, closed: bool) -> list[Any]:
        try:
            found = _call(json.loads(body), "arguments", "parameters")
        except ValueError:
            found = None
        if found is None:
            text = self.OPEN + body + (self.CLOSE if closed else "")
            return [ContentDelta(text)]
        return [self._add(*found)]


class JsonCallParser(ToolCallParser):
    TAG = "<|python_tag|>"

    def __init__(self, *keys: str) -> None:
        super().__init__()
        self._keys = keys or ("parameters", "arguments")
        self._buffer = ""
        self._content: bool | None = None  # undecided until the first visible character

    def feed(self, text: str) -> list[Any]:
        if self._content:
            return super().feed(text)
        self._buffer += text
        start = self._buffer.lstrip()
        if self._content is None and start:
            if start.startswith(("{", "[", self.TAG)):
                self._content = False
            elif not self.TAG.startswith(start):
                self._content = True
                rest, self._buffer = self._buffer, ""
                return [ContentDelta(rest)]
        return []

    def finish(self) -> list[Any]:
        text, self._buffer = self._buffer, ""
        found = []
        for obj in _json_values(text.strip().removeprefix(self.TAG)) or []:
            for item in obj if isinstance(obj, list) else [obj]:
                call = _call(item, *self._keys)
                if call is None:
                    return [ContentDelta(text)] if text else []
                found.append(call)
        if not found:
            return [ContentDelta(text)] if text else []
        return [self._add(*call) for call in found]


def _json_values(text: str) -> list[Any] | None:
    """The JSON values of ``text`` separated by ``;`` (decoded one by one, so a ``;`` inside a string
    stays in it); None when ``text`` is anything else."""
    decoder, values, at = json.JSONDecoder(), [], 0
    while True:
        at = len(text) - len(text[at:].lstrip())
        if at == len(text):
            return values
        try:
            value, at = decoder.raw_decode(text, at)
        except ValueError:
            return None
        values.append(value)
        rest = text[at:].lstrip()
        if rest and not rest.startswith(";"):
            return None
        at = len(text) - len(rest) + (1 if rest else 0)


class ArgumentsParser(ToolCallParser):
    """The reply is the named function's arguments: each delta is a piece of them."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self._name = name

    def feed(self, text: str) -> list[Any]:
        if not text:
            return []
        if not self.calls:
            return [self._add(self._name, text)]
        self.calls[0].arguments += text
        return [CallDelta(0, text)]


def parser_for(kind: str, name: str | None = None) -> ToolCallParser:
    """The parser for a format (see the module docstring); ``name``: the function, for ``arguments``."""
    if kind == "hermes":
        return HermesParser()
    if kind == "json":
        return JsonCallParser("parameters", "arguments")
    if kind == "call":
        return JsonCallParser("arguments")
    if kind == "arguments" and name is not None:
        return ArgumentsParser(name)
    return ToolCallParser()
