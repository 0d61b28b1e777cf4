"""Tools on ``/v1/chat/completions``: the request's ``tools`` and ``tool_choice``, and what they make of a reply.

:func:`parse_tools` validates ``tools`` (functions with JSON Schema ``parameters``) and ``tool_choice``
(``"auto"``, ``"none"``, ``"required"`` or ``{"type": "function", "function": {"name": ...}}``).
:func:`plan_tools` decides, for the engine's template (``Engine.tool_call_format``), how the reply is made:

=================  =============================================  ==========================================
tool_choice        the model's template renders tools             the template has no tool support
=================  =============================================  ==========================================
``auto``           tools rendered by the template; calls parsed   400: the template cannot offer tools
                   from the reply in the template's format
``required``       decoding constrained to one call,              the same, the tools described in a
                   ``{"name": ..., "arguments": {...}}``          system message
a named function   decoding constrained to its arguments          the same, the function described in a
                                                                  system message
``none``           no tools                                       no tools
=================  =============================================  ==========================================

Constrained calls always parse and their arguments validate against the function's ``parameters``.
Earlier calls and ``role: "tool"`` results in the conversation go to a tool-aware template as they are
(each call's ``arguments`` as an object, as templates expect); for a template without tool support
they become text: the call as the JSON the assistant wrote, the result as a user message
(:func:`plain_tool_messages`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from chatstream_asgi.engines.base import ChatMessage
from chatstream_asgi.protocols.structured import FormatError, schema_text
from chatstream_asgi.protocols.tool_calls import ToolCallParser, parser_for

__all__ = ["Tool", "ToolPlan", "ToolRequest", "parse_tools", "plain_tool_messages", "plan_tools"]

_CHOICES = ("auto", "none", "required")
_ANY_OBJECT: Mapping[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: Mapping[str, Any]
    spec: Mapping[str, Any]
    """The tool as the request declared it (what a template renders)."""


@dataclass(frozen=True)
class ToolRequest:
    tools: tuple[Tool, ...]
    choice: str
    """``auto``, ``required`` or ``function`` (then :attr:`function` names it)."""
    function: str | None = None


@dataclass(frozen=True)
class ToolPlan:
    """How one reply is made with tools (see the module docstring)."""

    request: ToolRequest
    template_format: str | None

    @property
    def template_tools(self) -> list[Mapping[str, Any]] | None:
        """The tools the template renders (None: the template is not asked)."""
        return [t.spec for t in self.request.tools] if self.template_format else None

    def json_schema(self) -> str | None:
        """What decoding is constrained to (None: free, parsed afterwards)."""
        request = self.request
        if request.choice == "function":
            tool = next(t for t in request.tools if t.name == request.function)
            return schema_text(tool.parameters, param="tools")
        if request.choice == "required":
            if len(request.tools) == 1:
                return schema_text(_call_schema(request.tools[0], "#"), param="tools")
            calls = [_call_schema(t, f"#/anyOf/{i}") for i, t in enumerate(request.tools)]
            return schema_text({"anyOf": calls}, param="tools")
        return None

    def parser(self) -> ToolCallParser:
        """A new parser for one reply."""
        choice = self.request.choice
        if choice == "function":
            return parser_for("arguments", self.request.function)
        return parser_for("call" if choice == "required" else self.template_format or "")

    def system_note(self) -> str | None:
        """For a template without tool support: the text that tells the model what to write."""
        if self.template_format:
            return None
        request = self.request
        if request.choice == "function":
            tool = next(t for t in request.tools if t.name == request.function)
            return (
                f"Call the function {tool.name}{_about(tool)}. Reply with its arguments only, as a JSON object "
                f"valid against this JSON Schema: {json.dumps(tool.parameters, ensure_ascii=False)}"
            )
        listing = "\n".join(
            f"- {t.name}{_about(t)}; arguments: {json.dumps(t.parameters, ensure_ascii=False)}" for t in request.tools
        )
        return (
            f"You call functions. The functions:\n{listing}\nReply with one call only, as a JSON object "
            '{"name": <the function\'s name>, "arguments": <its arguments>}.'
        )


def _about(tool: Tool) -> str:
    return f" ({tool.description})" if tool.description else ""


def _call_schema(tool: Tool, at: str) -> dict[str, Any]:
    """The call object ``{"name", "arguments"}`` of ``tool``, placed at the JSON pointer ``at`` of the schema."""
    return {
        "type": "object",
        "properties": {
            "name": {"const": tool.name},
            "arguments": _rebased(tool.parameters, f"{at}/properties/arguments"),
        },
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _rebased(schema: Any, root: str) -> Any:
    """``schema`` moved to the pointer ``root``: its local ``$ref`` pointers (``#/$defs/...``, ``#``) are
    relative to the document's root, so they are prefixed to keep pointing inside it."""
    if isinstance(schema, Mapping):
        ref = schema.get("$ref")
        moved = {key: _rebased(value, root) for key, value in schema.items()}
        if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
            moved["$ref"] = root + ref[1:]
        return moved
    if isinstance(schema, list):
        return [_rebased(item, root) for item in schema]
    return schema


def _tool(item: Any, i: int) -> Tool:
    if not isinstance(item, Mapping) or item.get("type") != "function" or not isinstance(item.get("function"), Mapping):
        raise FormatError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", param="tools")
    function = item["function"]
    name = function.get("name")
    if not isinstance(name, str) or not name or len(name) > 64:
        raise FormatError(f"tools[{i}].function.name must be a string of 1 to 64 characters", param="tools")
    description = function.get("description") or ""
    if not isinstance(description, str):
        raise FormatError(f"tools[{i}].function.description must be a string", param="tools")
    parameters = function.get("parameters") or _ANY_OBJECT
    if not isinstance(parameters, Mapping):
        raise FormatError(f"tools[{i}].function.parameters must be a JSON Schema object", param="tools")
    return Tool(name, description, parameters, item)


def parse_tools(data: Mapping[str, Any]) -> ToolRequest | None:
    """The request's tools and tool choice; None when it offers none (or ``tool_choice`` is ``none``)."""
    raw, choice = data.get("tools"), data.get("tool_choice")
    if raw is None:
        if choice not in (None, "none", "auto"):
            raise FormatError("tool_choice needs tools", param="tool_choice")
        return None
    if not isinstance(raw, list) or not raw:
        raise FormatError("tools must be a non-empty list", param="tools")
    tools = tuple(_tool(item, i) for i, item in enumerate(raw))
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise FormatError("tools must have distinct names", param="tools")
    if choice is None or choice in _CHOICES:
        choice = choice or "auto"
        return None if choice == "none" else ToolRequest(tools, choice)
    if isinstance(choice, Mapping) and isinstance(choice.get("function"), Mapping):
        name = choice["function"].get("name")
        if name not in names:
            raise FormatError(f"tool_choice names a function that is not in tools: {name!r}", param="tool_choice")
        return ToolRequest(tools, "function", name)
    raise FormatError(
        "tool_choice must be 'auto', 'none', 'required' or {'type': 'function', 'function': {'name': ...}}",
        param="tool_choice",
        code="unsupported_value",
    )


def plan_tools(request: ToolRequest, template_format: str | None) -> ToolPlan:
    """How the reply is made (see the module docstring); :class:`FormatError` where it cannot be."""
    if request.choice == "auto" and template_format is None:
        raise FormatError(
            "this model's chat template has no tool support, so tool_choice 'auto' cannot offer tools; "
            "send tool_choice 'required' or a named function (decoding is then constrained to a call) or 'none'",
            param="tools",
            code="unsupported_value",
        )
    return ToolPlan(request, template_format)


def plain_tool_messages(messages: Sequence[ChatMessage]) -> list[ChatMessage]:
    """The conversation for a template without tool support (or a remote engine): earlier calls as the JSON
    the assistant wrote, each tool result as a user message that says which call it answers (a template
    may know no ``tool`` role, and a remote server wants the tool messages' calls declared)."""
    out: list[ChatMessage] = []
    for message in messages:
        calls = message.get("tool_calls")
        if calls:
            text = "\n".join(json.dumps(c["function"], ensure_ascii=False) for c in calls)
            message = {"role": message["role"], "content": "\n".join(filter(None, [message["content"], text]))}
        elif message["role"] == "tool":
            name = message.get("name") or message.get("tool_call_id") or "the function"
            message = {"role": "user", "content": f"The call of {name} returned: {message['content']}"}
        out.append(message)
    return out
