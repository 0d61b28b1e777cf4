"""``response_format``, ``tools`` / ``tool_choice`` and ``logprobs`` as ``/v1/chat/completions`` and
``/chat_stream`` parse them: what reaches the engine, and each refusal's OpenAI error (param, code)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from chatstream_asgi.protocols.chat import InvalidRequest, parse_chat_request
from chatstream_asgi.protocols.openai import OpenAIError, parse_chat_completion
from chatstream_asgi.protocols.tools import plain_tool_messages, plan_tools

USER = [{"role": "user", "content": "hi"}]
SCHEMA = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
HUGE = "x" * 200_000
TOOL = {"type": "function", "function": {"name": "f", "parameters": SCHEMA}}


def parse(**fields: Any):
    return parse_chat_completion(json.dumps({"messages": USER, **fields}).encode())


def test_response_formats_become_schemas_in_their_key_order() -> None:
    assert parse().json_schema is None
    assert parse(response_format={"type": "text"}).json_schema is None
    assert json.loads(parse(response_format={"type": "json_object"}).json_schema) == {"type": "object"}
    spec = {"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA, "strict": True}}
    text = parse(response_format=spec).json_schema
    assert json.loads(text) == SCHEMA and text.index('"b"') < text.index('"a"')  # the reply's property order


def test_chat_stream_takes_a_schema_beside_the_original_fields() -> None:
    formats = frozenset({"text"})
    body = {"user_input": "hi", "json_schema": SCHEMA}
    assert json.loads(parse_chat_request(body, formats=formats).json_schema) == SCHEMA
    body = {"user_input": "hi", "response_format": {"type": "json_object"}}
    assert json.loads(parse_chat_request(body, formats=formats).json_schema) == {"type": "object"}
    with pytest.raises(InvalidRequest, match="json_schema must be a JSON object"):
        parse_chat_request({"user_input": "hi", "json_schema": "object"}, formats=formats)


@pytest.mark.parametrize(
    ("fields", "param", "code", "words"),
    [
        ({"response_format": {"type": "yaml"}}, "response_format", "unsupported_value", "json_schema"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "invalid_value", "'schema'"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}},
         "response_format.json_schema.schema", "invalid_json_schema", "JSON Schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": [HUGE]}}}},
         "response_format.json_schema.schema", "schema_too_complex", "too large"),
        ({"logprobs": "yes"}, "logprobs", "invalid_request", "boolean"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "invalid_request", "0 to 20"),
        ({"top_logprobs": 2}, "top_logprobs", "invalid_request", "logprobs: true"),
        ({"tools": [{"type": "function"}]}, "tools", "invalid_value", "tools[0]"),
        ({"tools": [TOOL, TOOL]}, "tools", "invalid_value", "distinct"),
        ({"tools": [TOOL], "tool_choice": "any"}, "tool_choice", "unsupported_value", "'required'"),
        ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice",
         "invalid_value", "'g'"),
        ({"tool_choice": "required"}, "tool_choice", "invalid_value", "needs tools"),
        ({"tools": [TOOL], "response_format": {"type": "json_object"}}, "response_format", "invalid_request", "either"),
    ],
)  # fmt: skip
def test_refusals_name_the_field_and_why(fields: dict, param: str, code: str, words: str) -> None:
    with pytest.raises(OpenAIError) as caught:
        parse(**fields)
    error = caught.value.body()["error"]
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")
    assert words in error["message"]


def test_logprobs_and_tool_choices() -> None:
    assert parse().logprobs is None
    assert parse(logprobs=True).logprobs == 0
    assert parse(logprobs=True, top_logprobs=20).logprobs == 20
    assert parse(tools=[TOOL]).tools.choice == "auto"
    assert parse(tools=[TOOL], tool_choice="none").tools is None
    named = parse(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "f"}}).tools
    assert (named.choice, named.function) == ("function", "f")
    assert json.loads(plan_tools(named, None).json_schema()) == SCHEMA
    required = plan_tools(parse(tools=[TOOL], tool_choice="required").tools, "hermes")
    assert json.loads(required.json_schema())["properties"]["name"] == {"const": "f"}
    assert required.template_tools == [TOOL] and required.system_note() is None
    assert (
        plan_tools(named, None).template_tools is None
        and "Call the function f" in plan_tools(named, None).system_note()
    )


NESTED = {  # as pydantic (openai.pydantic_function_tool, the Agents SDK) writes a nested model
    "$defs": {"Place": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
    "type": "object",
    "properties": {"where": {"$ref": "#/$defs/Place"}, "near": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}},
    "required": ["where"],
}


@pytest.mark.parametrize("count", [1, 2])
def test_required_calls_keep_the_parameters_refs_working(count: int, tmp_path) -> None:
    """``tool_choice: "required"`` nests each function's parameters in a call object: their ``$ref`` pointers
    must still find their ``$defs`` (and ``#``, the parameters themselves), or the schema is refused."""
    import jsonschema

    tools = [{"type": "function", "function": {"name": f"f{i}", "parameters": NESTED}} for i in range(count)]
    schema = json.loads(plan_tools(parse(tools=tools, tool_choice="required").tools, None).json_schema())
    arguments = {"where": {"city": "Paris"}, "near": {"where": {"city": "Lyon"}}}
    jsonschema.validate({"name": "f0", "arguments": arguments}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "f0", "arguments": {"where": {"town": "Paris"}}}, schema)
    pytest.importorskip("llguidance")
    from model_fixtures import build_tiny_tokenizer

    from chatstream_asgi.engines.transformers.grammar import Grammars

    tokenizer = build_tiny_tokenizer(tmp_path)
    Grammars(tokenizer, frozenset([tokenizer.eos_token_id]), len(tokenizer)).check(json.dumps(schema))


def test_tool_messages_continue_the_conversation() -> None:
    messages = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": "x"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
    ]  # fmt: skip
    parsed = parse_chat_completion(json.dumps({"messages": messages}).encode()).messages
    assert parsed[1]["tool_calls"][0]["function"] == {"name": "f", "arguments": {"a": "x"}}
    assert parsed[2] == {"role": "tool", "content": "42", "tool_call_id": "call_1", "name": "f"}
    with pytest.raises(OpenAIError, match="tool_call_id"):
        parse_chat_completion(json.dumps({"messages": [{"role": "tool", "content": "42"}]}).encode())
    assert plain_tool_messages(parsed) == [
        *USER,
        {"role": "assistant", "content": '{"name": "f", "arguments": {"a": "x"}}'},
        {"role": "user", "content": "The call of f returned: 42"},
    ]
