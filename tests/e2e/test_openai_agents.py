"""What agents built on the official ``openai`` client get from ``serve`` on the default model (``smollm2``).

One CLI server for the module (SmolLM2-135M-Instruct on CPU): ``chat.completions.parse`` with a Pydantic
model (20 prompts, 20 replies that validate), ``json_object`` replies that parse, a named tool call whose
nested arguments validate, the same call streamed as ``delta.tool_calls`` and reassembled, log-probabilities
that agree with the greedy picks, and a schema refused with a 400 before anything streams.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel
from servers import Server, free_port

pytestmark = pytest.mark.smollm2
pytest.importorskip("llguidance")


class Address(BaseModel):
    city: str
    country: str


class Person(BaseModel):
    name: str
    age: int
    occupation: str
    address: Address
    hobbies: list[str]


WEATHER = {
    "type": "object",
    "properties": {
        "location": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
            "required": ["city", "country"],
            "additionalProperties": False,
        },
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["location", "unit", "days"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_forecast", "description": "The weather forecast", "parameters": WEATHER},
    }
]
NAMED = {"type": "function", "function": {"name": "get_forecast"}}
ASK = [{"role": "user", "content": "What will the weather be like in Lyon, France over the next three days?"}]
PEOPLE = [
    ("Alice", "a nurse in Boston"), ("Bob", "a baker in Paris"), ("Chen", "an engineer in Shanghai"),
    ("Dana", "a teacher in Sydney"), ("Emil", "a pilot in Oslo"), ("Fatima", "a doctor in Cairo"),
    ("Goro", "a chef in Osaka"), ("Hana", "a painter in Prague"), ("Ivan", "a driver in Moscow"),
    ("Jia", "a student in Taipei"), ("Kofi", "a farmer in Accra"), ("Lena", "a lawyer in Berlin"),
    ("Miguel", "a musician in Madrid"), ("Nora", "a writer in Dublin"), ("Omar", "a tailor in Amman"),
    ("Priya", "a scientist in Pune"), ("Quinn", "a ranger in Denver"), ("Rosa", "a florist in Lima"),
    ("Sven", "a fisher in Bergen"), ("Tara", "a nurse in Delhi"),
]  # fmt: skip


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    port = free_port()
    command = [sys.executable, "-m", "chatstream_asgi", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--concurrency", "8", "--queue", "32"]  # fmt: skip
    srv = Server(command, port, {})
    try:
        srv.wait_ready(timeout=300)
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=300, max_retries=0)


def test_parse_with_a_pydantic_model_gives_20_replies_that_validate(client: openai.OpenAI) -> None:
    def ask(person: tuple[str, str]) -> tuple[str | None, Person | None]:
        messages = [{"role": "user", "content": f"Describe {person[0]}, {person[1]}, as a JSON profile."}]
        reply = client.chat.completions.parse(
            model="smollm2", messages=messages, response_format=Person, max_tokens=200
        )
        choice = reply.choices[0]
        return choice.finish_reason, choice.message.parsed

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, PEOPLE))
    assert all(finish == "stop" and isinstance(parsed, Person) for finish, parsed in replies), replies


def test_json_object_replies_always_parse(client: openai.OpenAI) -> None:
    def ask(topic: str) -> str | None:
        messages = [{"role": "user", "content": f"Give the facts about {topic} as a JSON object."}]
        reply = client.chat.completions.create(
            model="smollm2", messages=messages, response_format={"type": "json_object"}, max_tokens=256
        )
        return reply.choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, ["the Moon", "Paris", "water", "the Eiffel Tower", "cats", "Python"]))
    assert all(isinstance(json.loads(text or ""), dict) for text in replies), replies


def test_a_named_tool_call_validates_and_streams_as_the_same_call(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="smollm2", messages=ASK, tools=TOOLS, tool_choice=NAMED, max_tokens=120
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_forecast" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER)

    chunks = client.chat.completions.create(
        model="smollm2", messages=ASK, tools=TOOLS, tool_choice=NAMED, max_tokens=120, stream=True
    )
    streamed: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in chunks:
        delta = chunk.choices[0].delta
        assert not delta.content
        for item in delta.tool_calls or []:
            entry = streamed.setdefault(item.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += item.id or ""
            entry["name"] += item.function.name or ""
            entry["arguments"] += item.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and list(streamed) == [0]
    assert streamed[0]["name"] == "get_forecast" and streamed[0]["id"].startswith("call_")
    assert json.loads(streamed[0]["arguments"]) == arguments  # greedy: the same call


def test_logprobs_agree_with_the_greedy_choices(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reply = client.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=24, logprobs=True, top_logprobs=3
    )
    choice = reply.choices[0]
    entries = choice.logprobs.content
    assert entries and bytes(b for e in entries for b in e.bytes).decode().startswith(choice.message.content)
    for entry in entries:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert (entry.top_logprobs[0].token, entry.top_logprobs[0].logprob) == (entry.token, entry.logprob)
    streamed = client.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=24, logprobs=True, stream=True
    )
    tokens = [
        e.token
        for chunk in streamed
        if chunk.choices and chunk.choices[0].logprobs
        for e in chunk.choices[0].logprobs.content
    ]
    assert tokens == [e.token for e in entries]


def test_a_schema_it_cannot_follow_is_a_400_before_streaming(server: Server, client: openai.OpenAI) -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "format": "uri-reference"}}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="smollm2", messages=ASK, response_format=bad, stream=True)
    assert caught.value.body["code"] == "invalid_json_schema" and "uri-reference" in caught.value.body["message"]
    metrics = httpx.get(server.url + "/metrics").text
    assert 'chatstream_rejected_total{reason="invalid_request"} 1.0' in metrics
