"""Structured output on the wire: which JSON Schema a request asks its reply to follow.

OpenAI's ``response_format`` (``/v1/chat/completions``, and ``/chat_stream`` too):

- ``{"type": "text"}`` (or absent): free text;
- ``{"type": "json_object"}``: any JSON object;
- ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}``: JSON valid
  against ``schema``.

``/chat_stream`` also takes the shorthand ``"json_schema": {...}`` (the schema itself). The schema is
handed to the engine as JSON text (its key order kept: the reply's properties come in that order);
whether the engine can compile it is the engine's to say (``Engine.check_params``). No I/O here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

__all__ = [
    "JSON_OBJECT_SCHEMA",
    "MAX_SCHEMA_CHARS",
    "FormatError",
    "chat_json_schema",
    "response_format_schema",
    "schema_text",
]

JSON_OBJECT_SCHEMA = json.dumps({"type": "object"})
MAX_SCHEMA_CHARS = 100_000
"""A schema longer than this (as compact JSON) is refused before it reaches the grammar compiler."""


class FormatError(ValueError):
    """A request field that asks for a reply format this server refuses; ``param`` names the field."""

    def __init__(self, message: str, *, param: str = "response_format", code: str = "invalid_value") -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


def schema_text(schema: Any, *, param: str) -> str:
    """``schema`` as compact JSON text, after the checks that need no grammar compiler."""
    if not isinstance(schema, Mapping):
        raise FormatError(f"{param} must be a JSON object (a JSON Schema)", param=param, code="invalid_json_schema")
    text = json.dumps(schema, ensure_ascii=False, separators=(",", ":"))
    if len(text) > MAX_SCHEMA_CHARS:
        raise FormatError(
            f"{param} is too large ({len(text)} characters; at most {MAX_SCHEMA_CHARS})",
            param=param,
            code="schema_too_complex",
        )
    return text


def response_format_schema(value: Any, *, param: str = "response_format") -> str | None:
    """The JSON Schema (as JSON text) that OpenAI's ``response_format`` asks for; None: free text."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise FormatError(f"{param} must be an object", param=param)
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_OBJECT_SCHEMA
    if kind != "json_schema":
        raise FormatError(
            f"{param}.type must be one of 'text', 'json_object', 'json_schema' (got {kind!r})",
            param=param,
            code="unsupported_value",
        )
    spec = value.get("json_schema")
    if not isinstance(spec, Mapping):
        raise FormatError(f"{param}.json_schema must be an object with a 'schema'", param=param)
    name = spec.get("name", "response")
    if not isinstance(name, str) or not name:
        raise FormatError(f"{param}.json_schema.name must be a non-empty string", param=param)
    if "schema" not in spec:
        return JSON_OBJECT_SCHEMA
    return schema_text(spec["schema"], param=f"{param}.json_schema.schema")


def chat_json_schema(data: Mapping[str, Any]) -> str | None:
    """The schema a ``/chat_stream`` body asks for: ``response_format`` (as OpenAI's) or ``json_schema``."""
    if data.get("json_schema") is not None:
        if data.get("response_format") is not None:
            raise FormatError("send either response_format or json_schema, not both", param="json_schema")
        return schema_text(data["json_schema"], param="json_schema")
    return response_format_schema(data.get("response_format"))
