"""Parsing and validation of the chat request body.

The seed's body is ``{"user_input": str, "regenerate": bool}``; API clients may send
``{"messages": [{"role", "content"}, ...]}`` instead. Both take optional
``"generation_params"`` and ``"format"``. Anything malformed raises :class:`InvalidRequest`,
which the front door turns into ``400 {"error": "invalid_request", "detail": ...}``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from chatstream_asgi.engines.base import ChatMessage, GenerationParams

__all__ = [
    "ROLES",
    "ChatRequest",
    "InvalidRequest",
    "apply_params",
    "load_json_object",
    "parse_chat_request",
    "validate_params",
]

ROLES = frozenset({"system", "user", "assistant"})
MAX_STOP_STRINGS = 16


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
    raw: Mapping[str, Any] = field(default_factory=dict)


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
        if role not in ROLES:
            raise InvalidRequest(f"messages[{i}].role must be one of {sorted(ROLES)}")
        if not isinstance(content, str):
            raise InvalidRequest(f"messages[{i}].content must be a string")
        out.append({"role": role, "content": content})
    return out


def load_json_object(body: bytes | str | Mapping[str, Any]) -> Mapping[str, Any]:
    """The JSON object in ``body`` (raw bytes, text, or already parsed); :class:`InvalidRequest` otherwise."""
    if isinstance(body, (bytes, str)):
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidRequest(f"body is not valid JSON: {exc}") from None
    else:
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
    if fmt is not None and fmt not in formats:
        raise InvalidRequest(f"format must be one of {sorted(formats)}")
    request.format = fmt
    return request
