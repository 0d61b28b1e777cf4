"""Tool calls out of streamed text: what the client reassembles from the chunks equals what the reply holds,
wherever the model's text is split; text that is not a call stays content."""

from __future__ import annotations

import json
from typing import Any

import pytest

from chatstream_asgi.protocols.framing import Summary
from chatstream_asgi.protocols.openai_framing import OpenAIChunkFramer, OpenAICompletionFramer
from chatstream_asgi.protocols.tool_calls import parser_for

HERMES = (
    "Let me check.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"location": {"city": "Paris", "country": "FR"}, "unit": "celsius"}}'
    "\n</tool_call>\n<tool_call>\n"
    '{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
)
HERMES_CALLS = [
    ("get_weather", {"location": {"city": "Paris", "country": "FR"}, "unit": "celsius"}),
    ("get_time", {"zone": "CET"}),
]
LLAMA = '<|python_tag|>{"name": "get_time", "parameters": {"zone": "CET"}}'
CALL = '{"name":"get_time","arguments":{"zone":"CET"}}'
ARGUMENTS = '{"location":{"city":"Paris","country":"FR"},"unit":"celsius"}'


def stream(kind: str, text: str, pieces: int, name: str | None = None) -> tuple[str, list[tuple[str, dict]], str]:
    """``text`` streamed through an OpenAI chunk framer in ``pieces``-character deltas: the content, the calls
    (name, arguments) and the finish reason the client reassembles from the events."""
    framer = OpenAIChunkFramer("id", "m", 0, tools=parser_for(kind, name))
    wire = b"".join(framer.delta(text[i : i + pieces]) for i in range(0, len(text), pieces))
    wire += framer.final(Summary("mid", "stop", 1, 1))
    content, calls, finish = "", {}, None
    for line in wire.decode().split("\n\n"):
        if not line.startswith("data: {"):
            continue
        choice = json.loads(line[6:])["choices"][0]
        content += choice["delta"].get("content") or ""
        for item in choice["delta"].get("tool_calls") or []:
            call = calls.setdefault(item["index"], {"name": "", "arguments": ""})
            if "id" in item:
                assert item["id"].startswith("call_") and item["type"] == "function"
                call["name"] = item["function"]["name"]
            call["arguments"] += item["function"]["arguments"]
        finish = choice["finish_reason"] or finish
    return content, [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())], finish


def complete(kind: str, text: str, name: str | None = None) -> dict[str, Any]:
    framer = OpenAICompletionFramer("id", "m", 0, tools=parser_for(kind, name))
    framer.delta(text)
    return json.loads(framer.final(Summary("mid", "stop", 1, 1)))["choices"][0]


@pytest.mark.parametrize("pieces", [1, 3, 7, 1000])
def test_hermes_calls_stream_and_reassemble(pieces: int) -> None:
    content, calls, finish = stream("hermes", HERMES, pieces)
    assert content.strip() == "Let me check."
    assert calls == HERMES_CALLS
    assert finish == "tool_calls"
    choice = complete("hermes", HERMES)
    assert choice["message"]["content"] == "Let me check."
    assert [
        (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in choice["message"]["tool_calls"]
    ] == (HERMES_CALLS)
    assert choice["finish_reason"] == "tool_calls"


@pytest.mark.parametrize(
    ("kind", "text", "calls", "name"),
    [
        ("json", LLAMA, [("get_time", {"zone": "CET"})], None),
        (
            "json",
            '{"name": "a", "parameters": {}}; {"name": "b", "arguments": {"x": 1}}',
            [("a", {}), ("b", {"x": 1})],
            None,
        ),
        ("call", CALL, [("get_time", {"zone": "CET"})], None),
        ("arguments", ARGUMENTS, [("get_weather", json.loads(ARGUMENTS))], "get_weather"),
    ],
)
@pytest.mark.parametrize("pieces", [1, 5])
def test_json_calls_stream_and_reassemble(kind: str, text: str, calls: list, name: str | None, pieces: int) -> None:
    content, got, finish = stream(kind, text, pieces, name)
    assert (content, got, finish) == ("", calls, "tool_calls")
    assert complete(kind, text, name)["message"]["content"] is None


@pytest.mark.parametrize(
    ("kind", "text"),
    [
        ("hermes", "No tools needed: 2 < 3 and <tool is not a tag."),
        ("hermes", "<tool_call>not json</tool_call> done"),
        ("json", "The weather is fine."),
        ("json", '{"no": "name"}'),
        ("call", '{"name":"get_time","argu'),  # cut by the length limit
    ],
)
def test_text_that_is_not_a_call_stays_content(kind: str, text: str) -> None:
    for pieces in (1, 4):
        content, calls, finish = stream(kind, text, pieces)
        assert (content, calls, finish) == (text, [], "stop")
    choice = complete(kind, text)
    assert choice["message"] == {"role": "assistant", "content": text}
    assert choice["finish_reason"] == "stop"


def test_a_reply_cut_by_the_length_limit_keeps_length() -> None:
    framer = OpenAIChunkFramer("id", "m", 0, tools=parser_for("arguments", "f"))
    framer.delta('{"a":')
    assert b'"finish_reason":"length"' in framer.final(Summary("mid", "length", 1, 1))


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{% for m in messages %}{{ m.content }}{% endfor %}", None),  # SmolLM2's kind: never reads tools
        ("{% if tools %}{% for t in tools %}{{ t | tojson }}{% endfor %}<tool_call>{% endif %}", "hermes"),  # Qwen
        ('{% if tools %}Respond with {"name": ..., "parameters": ...}{% endif %}<|python_tag|>', "json"),  # Llama
        ("{% if tools %", None),  # a template that does not parse offers nothing
        (None, None),
    ],
)
def test_the_template_says_how_tools_are_called(template: str | None, expected: str | None) -> None:
    from types import SimpleNamespace

    from chatstream_asgi.engines.transformers.loading import tool_call_format

    assert tool_call_format(SimpleNamespace(chat_template=template)) == expected


@pytest.mark.parametrize(
    ("kind", "text", "calls"),
    [
        ("call", '{"name":"sh","arguments":{"cmd":"ls; pwd"}}', [("sh", {"cmd": "ls; pwd"})]),
        ("json", '{"name": "sh", "parameters": {"cmd": "a;b"}}', [("sh", {"cmd": "a;b"})]),
        (
            "json",
            '{"name": "a", "parameters": {"s": ";"}} ; {"name": "b", "parameters": {}}',
            [("a", {"s": ";"}), ("b", {})],
        ),
    ],
)
def test_a_semicolon_inside_the_arguments_does_not_split_the_call(kind: str, text: str, calls: list) -> None:
    assert stream(kind, text, 3) == ("", calls, "tool_calls")
    message = complete(kind, text)["message"]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] == calls
