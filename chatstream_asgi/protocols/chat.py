"""Parsing and validation of the chat request body.

The seed's body is ``{"user_input": str, "regenerate": bool}``; API clients may send
``{"messages": [{"role", "content"}, ...]}`` instead. Both take optional
``"generation_params"``, ``"format"`` and a schema for the reply (``"response_format"`` as OpenAI's, or
``"json_schema"``). Anything malformed raises :class:`InvalidRequest`,
which the front door turns into ``400 {"error": "invalid_request", "detail": ...}``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from chatstream_asgi.engines.base import ChatMessage, GenerationParams
from chatstream_asgi.protocols.structured import FormatError, chat_json_schema

__all__ = [
    "MAX_INT_DIGITS",
    "MAX_JSON_DEPTH",
    "MAX_PRIORITY",
    "ROLES",
    "ChatRequest",
    "InvalidRequest",
    "apply_params",
    "load_json_object",
    "parse_chat_request",
    "parse_priority",
    "validate_params",
]

ROLES = frozenset({"system", "user", "assistant"})
MAX_STOP_STRINGS = 16
MAX_JSON_DEPTH = 32
"""Deepest nesting of objects and lists a request body may have."""
MAX_INT_DIGITS = 40
"""Longest integer a request body may hold (a seed needs 19 digits)."""
MAX_INT_BITS = 133  # 10**40 < 2**133


class InvalidRequest(ValueError):
    """The request body is not a valid chat request; ``detail`` says why."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


@dataclass
class ChatRequest:
    """A validated chat request."""

    user_input: str | None = None
    messages: list[ChatMessage] | None = None
    regenerate: bool = False
    generation_params: dict[str, Any] = field(default_factory=dict)
    format: str | None = None
    priority: int = 0
    """Lower is served first, among the requests of the same tenant (vLLM's ``priority``)."""
    raw: Mapping[str, Any] = field(default_factory=dict)
    json_schema: str | None = None
    """The schema the reply must follow (``response_format`` or ``json_schema``; see ``protocols/structured.py``)."""


def _number(name: str, lo: float, hi: float, *, lo_open: bool = False) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InvalidRequest(f"generation_params.{name} must be a number")
        if value < lo or (lo_open and value == lo) or value > hi:
            left = "(" if lo_open else "["
            raise InvalidRequest(f"generation_params.{name} must be in {left}{lo}, {hi}]")
        return float(value)

    return check


def _integer(name: str, lo: int, hi: int | None = None) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidRequest(f"generation_params.{name} must be an integer")
        if value < lo or (hi is not None and value > hi):
            bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            raise InvalidRequest(f"generation_params.{name} must be {bound}")
        return value

    return check


def _stop(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or len(value) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in value):
        raise InvalidRequest(
            f"generation_params.stop must be a non-empty string or a list of at most "
            f"{MAX_STOP_STRINGS} non-empty strings"
        )
    return tuple(value)


def _seed(value: Any) -> int | None:
    if value is None:
        return None
    return _integer("seed", 0, 2**63 - 1)(value)


_VALIDATORS: dict[str, Callable[[Any], Any]] = {
    "temperature": _number("temperature", 0.0, 5.0),
    "top_k": _integer("top_k", 0),
    "top_p": _number("top_p", 0.0, 1.0, lo_open=True),
    "repetition_penalty": _number("repetition_penalty", 0.0, 10.0, lo_open=True),
    "max_new_tokens": _integer("max_new_tokens", 1),
    "stop": _stop,
    "seed": _seed,
}


def validate_params(params: Any, *, allowed: frozenset[str] | None = None) -> dict[str, Any]:
    """Check a ``generation_params`` object; returns the normalised values."""
    if not isinstance(params, Mapping):
        raise InvalidRequest("generation_params must be an object")
    names = allowed if allowed is not None else _VALIDATORS.keys()
    out: dict[str, Any] = {}
    for key, value in params.items():
        if key not in names:
            raise InvalidRequest(f"generation_params.{key} is not a known parameter")
        out[key] = _VALIDATORS[key](value)
    return out


def apply_params(base: GenerationParams, overrides: Mapping[str, Any], *, max_new_tokens: int) -> GenerationParams:
    """``base`` with validated ``overrides``; ``max_new_tokens`` is capped by the server's limit."""
    params = replace(base, **overrides) if overrides else base
    if params.max_new_tokens > max_new_tokens:
        if "max_new_tokens" in overrides:
            raise InvalidRequest(f"generation_params.max_new_tokens must be at most {max_new_tokens}")
        params = replace(params, max_new_tokens=max_new_tokens)
    return params


def _messages(value: Any) -> list[ChatMessage]:
    if not isinstance(value, list) or not value:
        raise InvalidRequest("messages must be a non-empty list")
    out: list[ChatMessage] = []
    for i, item in enumerate(value):
        if not isinstance(item, Mapping):
            raise InvalidRequest(f"messages[{i}] must be an object")
        role, content = item.get("role"), item.get("content")
        if not isinstance(role, str) or role not in ROLES:
            raise InvalidRequest(f"messages[{i}].role must be one of {sorted(ROLES)}")
        if not isinstance(content, str):
            raise InvalidRequest(f"messages[{i}].content must be a string")
        out.append({"role": role, "content": content})
    return out


def _reject_constant(name: str) -> Any:
    raise InvalidRequest(f"body holds {name}, which JSON does not allow")


def _parse_int(text: str) -> int:
    if len(text) > MAX_INT_DIGITS:
        raise InvalidRequest(f"body holds an integer of more than {MAX_INT_DIGITS} digits")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise InvalidRequest("body holds a number too large for a float")
    return value


def _check_values(data: Any, *, strings: bool) -> None:
    """Walk parsed JSON (iteratively): bounded nesting, finite numbers, and (with ``strings``) text
    that can be encoded again, since it is echoed in errors, logged and stored."""
    stack = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if strings and not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    raise InvalidRequest("body holds a lone UTF-16 surrogate, which is not text") from None
        elif isinstance(value, (Mapping, list, tuple)):
            if depth >= MAX_JSON_DEPTH:
                raise InvalidRequest(f"body is nested more than {MAX_JSON_DEPTH} levels deep")
            items = [*value.keys(), *value.values()] if isinstance(value, Mapping) else value
            stack.extend((item, depth + 1) for item in items)
        elif isinstance(value, float) and not math.isfinite(value):
            raise InvalidRequest("body holds a number that is not finite")
        elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_INT_BITS:
            raise InvalidRequest(f"body holds an integer of more than {MAX_INT_DIGITS} digits")


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def load_json_object(body: bytes | str | Mapping[str, Any]) -> Mapping[str, Any]:
    """The JSON object in ``body`` (raw bytes, text, or already parsed); :class:`InvalidRequest` otherwise.

    The one JSON loader of every endpoint. Beyond syntax it refuses what parses but would break
    later: nesting deeper than :data:`MAX_JSON_DEPTH`, integers of more than
    :data:`MAX_INT_DIGITS` digits, ``NaN``/``Infinity`` and numbers that overflow a float, and
    lone UTF-16 surrogates (``"\\ud800"``) in keys or text.
    """
    if isinstance(body, (bytes, str)):
        try:
            text = body.decode("utf-8") if isinstance(body, bytes) else body
            data = json.loads(text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_reject_constant)
        except UnicodeDecodeError:
            raise InvalidRequest("body is not valid UTF-8") from None
        except json.JSONDecodeError as exc:
            if text.isspace() or not text:
                raise InvalidRequest("body is empty: expected a JSON object") from None
            raise InvalidRequest(f"body is not valid JSON: {exc}") from None
        except RecursionError:
            raise InvalidRequest(f"body is nested more than {MAX_JSON_DEPTH} levels deep") from None
        # Bytes that decode as UTF-8 hold no surrogate: only a \\uD800-\\uDFFF escape can make one.
        _check_values(data, strings=isinstance(body, str) or _SURROGATE_ESCAPE.search(text) is not None)
    else:
        _check_values(body, strings=True)
        data = body
    if not isinstance(data, Mapping):
        raise InvalidRequest("body must be a JSON object")
    return data


def parse_chat_request(body: bytes | str | Mapping[str, Any], *, formats: frozenset[str]) -> ChatRequest:
    """Parse and validate a chat request body (raw bytes, text, or already-parsed JSON)."""
    data = load_json_object(body)

    request = ChatRequest(raw=data)
    if "user_input" in data and "messages" in data:
        raise InvalidRequest("send either user_input or messages, not both")
    if "messages" in data:
        request.messages = _messages(data["messages"])
    elif "user_input" in data:
        if not isinstance(data["user_input"], str):
            raise InvalidRequest("user_input must be a string")
        request.user_input = data["user_input"]

    regenerate = data.get("regenerate", False)
    if not isinstance(regenerate, bool):
        raise InvalidRequest("regenerate must be a boolean")
    request.regenerate = regenerate
    if request.messages is not None and regenerate:
        raise InvalidRequest("regenerate applies to session history, not to messages")
    if request.messages is None and request.user_input is None and not regenerate:
        raise InvalidRequest("user_input (or messages) is required")

    if "generation_params" in data and data["generation_params"] is not None:
        request.generation_params = validate_params(data["generation_params"])

    fmt = data.get("format")
    if fmt is not None and (not isinstance(fmt, str) or fmt not in formats):
        raise InvalidRequest(f"format must be one of {sorted(formats)}")
    request.format = fmt
    request.priority = parse_priority(data.get("priority"))
    try:
        request.json_schema = chat_json_schema(data)
    except FormatError as exc:
        raise InvalidRequest(exc.message) from None
    return request


MAX_PRIORITY = 100


def parse_priority(value: Any) -> int:
    """A body's ``priority``: an integer from ``-MAX_PRIORITY`` to ``MAX_PRIORITY`` (absent: 0)."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or abs(value) > MAX_PRIORITY:
        raise InvalidRequest(f"priority must be an integer between {-MAX_PRIORITY} and {MAX_PRIORITY}")
    return value
