"""Structured output, tools and their refusals over HTTP, on a tiny random model behind a real server.

Only the grammar can make a random model write JSON: every reply to a schema must parse and validate,
for hypothesis-generated schemas too, or the schema is refused before anything streams (a 400 in
OpenAI's shape that says why, counted as ``invalid_request``). Tools: a template with tool support
(Qwen's ``<tool_call>`` format) renders them and the conversation's calls and results; ``required`` and a
named function give calls whose arguments validate; a template without tool support refuses ``auto``.
"""

from __future__ import annotations

import copy
import json
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from live_server import serve_in_thread

from chatstream_asgi import ChatStream, MockEngine
from chatstream_asgi.engines.transformers import TransformersEngine
from chatstream_asgi.service.exchange import get_result
from chatstream_asgi.web.app import create_app

pytest.importorskip("llguidance")

HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nFunctions:\n<tools>\n"
    "{%- for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools>\n"
    'Call one as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>\n{% endif %}'
    "{%- for message in messages %}"
    "{%- if message.role == 'tool' %}<|im_start|>user\n<tool_response>{{ message.content }}</tool_response><|im_end|>\n"
    "{%- elif message.tool_calls %}<|im_start|>assistant\n{%- for call in message.tool_calls %}"
    "<tool_call>{{ call.function | tojson }}</tool_call>{% endfor %}<|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WEATHER = {
    "type": "object",
    "properties": {
        "location": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["location", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"enum": ["CET", "UTC"]}}, "required": ["zone"], "additionalProperties": False}}},
]  # fmt: skip
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


class Served:
    """A ChatStream on an engine behind hypercorn; ``prompts`` collects each finished request's prompt."""

    def __init__(self, engine: Any) -> None:
        self.prompts: list[str] = []
        self._ended = threading.Condition()
        self.cs = ChatStream(
            engine, num_of_concurrent_executions=4, max_new_tokens=512, session_secret="s", callback=self._done
        )
        self.client: httpx.Client

    def _done(self, request: Any, state: str) -> None:
        result = get_result(request)
        with self._ended:
            self.prompts.append(result.prompt if result else "")
            self._ended.notify_all()

    def last_prompt(self, count: int) -> str:
        """The prompt of the ``count``-th request to end (the callback runs after the reply's last byte)."""
        with self._ended:
            assert self._ended.wait_for(lambda: len(self.prompts) >= count, timeout=60)
            return self.prompts[count - 1]

    def post(self, body: dict[str, Any], path: str = "/v1/chat/completions") -> httpx.Response:
        return self.client.post(path, json={"model": "m", "max_tokens": 200, **body})

    def rejected(self) -> float:
        return (
            self.cs.metrics.registry.get_sample_value("chatstream_rejected_total", {"reason": "invalid_request"}) or 0
        )


def serve(engine: Any) -> Iterator[Served]:
    served = Served(engine)
    with serve_in_thread(create_app(served.cs)) as url, httpx.Client(base_url=url, timeout=120) as client:
        served.client = client
        yield served


@pytest.fixture(scope="module")
def plain(tiny_engine: TransformersEngine) -> Iterator[Served]:
    """The tiny model with a ChatML template (no tool support)."""
    yield from serve(
        TransformersEngine(
            tiny_engine.model, tiny_engine.tokenizer, tiny_engine.device, compile_mode=None, context_len=2048
        )
    )


@pytest.fixture(scope="module")
def hermes(tiny_engine: TransformersEngine) -> Iterator[Served]:
    """The tiny model with a Qwen-style template that renders tools."""
    tokenizer = copy.deepcopy(tiny_engine.tokenizer)
    tokenizer.chat_template = HERMES_TEMPLATE
    yield from serve(
        TransformersEngine(tiny_engine.model, tokenizer, tiny_engine.device, compile_mode=None, context_len=2048)
    )


def content(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def schema_format(schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}}


def test_replies_follow_their_schema_on_both_endpoints(plain: Served) -> None:
    reply = json.loads(content(plain.post({"messages": USER, "response_format": schema_format(WEATHER)})))
    jsonschema.validate(reply, WEATHER)
    for body in ({"user_input": "Weather?", "json_schema": WEATHER, "format": "text"},
                 {"messages": USER, "response_format": schema_format(WEATHER), "format": "text"}):  # fmt: skip
        response = plain.client.post("/chat_stream", json=body)
        assert response.status_code == 200, response.text
        jsonschema.validate(json.loads(response.text), WEATHER)


@pytest.mark.parametrize(
    ("body", "param", "code", "words"),
    [
        ({"response_format": schema_format({"type": "string", "format": "uri-reference"})}, "response_format",
         "invalid_json_schema", "Unknown format: uri-reference"),
        ({"response_format": schema_format({"type": "integer", "minimum": 3, "maximum": 1})}, "response_format",
         "invalid_json_schema", "nsatisfiable"),
        ({"response_format": {"type": "grammar"}}, "response_format", "unsupported_value", "json_schema"),
        ({"tools": TOOLS}, "tools", "unsupported_value", "no tool support"),
        ({"logprobs": True, "top_logprobs": 50}, "top_logprobs", "invalid_request", "0 to 20"),
    ],
)  # fmt: skip
def test_refusals_are_400s_in_openai_shape_and_counted(
    plain: Served, body: dict, param: str, code: str, words: str
) -> None:
    before = plain.rejected()
    response = plain.post({"messages": USER, **body, "stream": True})
    assert response.status_code == 400 and response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")
    assert words in error["message"]
    assert plain.rejected() == before + 1


def test_chat_stream_refuses_a_bad_schema_in_its_own_shape(plain: Served) -> None:
    response = plain.client.post("/chat_stream", json={"user_input": "x", "json_schema": {"type": "objekt"}})
    assert response.status_code == 400
    assert response.json() == {
        "error": "invalid_request",
        "detail": "the JSON schema cannot be used: Invalid type: objekt",
    }


def test_without_the_extra_a_schema_is_refused_naming_it(tiny_engine: TransformersEngine, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "llguidance", None)  # as if not installed
    engine = TransformersEngine(
        tiny_engine.model, tiny_engine.tokenizer, tiny_engine.device, compile_mode=None, context_len=2048
    )
    for served in serve(engine):
        error = served.post({"messages": USER, "response_format": {"type": "json_object"}}).json()["error"]
        assert "pip install 'chatstream-asgi[structured]'" in error["message"] and error["param"] == "response_format"


def test_engines_that_cannot_constrain_refuse_clearly() -> None:
    for served in serve(MockEngine()):
        error = served.post({"messages": USER, "response_format": {"type": "json_object"}}).json()["error"]
        assert error["message"] == "this engine cannot constrain its output to a schema"
        error = served.post({"messages": USER, "logprobs": True}).json()["error"]
        assert (error["param"], error["message"]) == ("logprobs", "this engine does not report log-probabilities")


def test_tool_calls_with_a_template_that_renders_tools(hermes: Served) -> None:
    assert hermes.cs.engine.tool_call_format == "hermes"
    reply = hermes.post({"messages": USER, "tools": TOOLS})  # auto: free text, parsed afterwards
    assert reply.status_code == 200 and reply.json()["choices"][0]["finish_reason"] in ("stop", "length")
    prompt = hermes.last_prompt(1)
    assert '"name": "get_weather"' in prompt and "<tools>" in prompt
    for choice, name in (
        ("required", None),
        ({"type": "function", "function": {"name": "get_weather"}}, "get_weather"),
    ):
        choice_json = hermes.post({"messages": USER, "tools": TOOLS, "tool_choice": choice}).json()["choices"][0]
        assert choice_json["finish_reason"] == "tool_calls" and choice_json["message"]["content"] is None
        (call,) = choice_json["message"]["tool_calls"]
        assert call["id"].startswith("call_") and (name is None or call["function"]["name"] == name)
        tool = next(t for t in TOOLS if t["function"]["name"] == call["function"]["name"])
        jsonschema.validate(json.loads(call["function"]["arguments"]), tool["function"]["parameters"])
    answered = [*USER, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": call["id"], "content": "sunny, 21 degrees"}]  # fmt: skip
    assert hermes.post({"messages": answered, "tools": TOOLS}).status_code == 200
    prompt = hermes.last_prompt(4)
    assert "<tool_response>sunny, 21 degrees</tool_response>" in prompt
    assert '<tool_call>{"name": "get_weather", "arguments": {"location": {"city": ' in prompt  # an object, not text


def test_a_template_without_tool_support_gets_constrained_calls_described_in_the_system_message(plain: Served) -> None:
    assert plain.cs.engine.tool_call_format is None
    named = {"type": "function", "function": {"name": "get_time"}}
    count = len(plain.prompts)
    choice = plain.post({"messages": USER, "tools": TOOLS, "tool_choice": named}).json()["choices"][0]
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_time" and json.loads(call["function"]["arguments"])["zone"] in (
        "CET",
        "UTC",
    )
    assert plain.last_prompt(count + 1).startswith("<|im_start|>system\nCall the function get_time.")


def _schemas() -> st.SearchStrategy[dict[str, Any]]:
    """Schemas whose replies are bounded (strings, arrays, objects closed): a random model's reply ends."""
    leaves = st.one_of(
        st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 6)),
        st.builds(
            lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
            st.integers(-50, 50),
            st.integers(0, 500),
        ),
        st.builds(
            lambda values: {"enum": values},
            st.lists(st.sampled_from(["a", "b", 1, None, True]), min_size=1, max_size=3, unique=True),
        ),
        st.just({"type": "boolean"}),
        st.just({"type": "null"}),
    )

    def objects(children: st.SearchStrategy) -> st.SearchStrategy:
        props = st.dictionaries(st.from_regex(r"[a-z]{1,5}", fullmatch=True), children, min_size=1, max_size=3)
        return props.flatmap(lambda p: st.builds(
            lambda required: {"type": "object", "properties": p, "required": required, "additionalProperties": False},
            st.lists(st.sampled_from(sorted(p)), unique=True)))  # fmt: skip

    def arrays(children: st.SearchStrategy) -> st.SearchStrategy:
        return st.builds(lambda items, n: {"type": "array", "items": items, "maxItems": n}, children, st.integers(0, 2))

    return st.recursive(leaves, lambda c: st.one_of(objects(c), arrays(c)), max_leaves=6)


_BROKEN = {"not": {}, "type": "objekt", "$ref": "#/$defs/nowhere"}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=_schemas(), broken=st.sampled_from([None, None, None, *_BROKEN]), seed=st.integers(0, 2**31))
def test_generated_schemas_are_followed_or_refused_with_the_reason(
    plain: Served, schema: dict, broken: str | None, seed: int
) -> None:
    if broken is not None:
        schema = {**schema, broken: _BROKEN[broken]}
    body = {"messages": USER, "response_format": schema_format(schema), "temperature": 1.0, "seed": seed,
            "max_tokens": 400}  # fmt: skip
    response = plain.post(body)
    if broken is None:
        reply = json.loads(content(response))
        jsonschema.validate(reply, schema)
    else:
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["code"] == "invalid_json_schema" and error["param"] == "response_format", error
        assert any(word in error["message"] for word in ("not", "objekt", "does not exist")), error


def test_a_schema_evicted_while_its_request_waited_compiles_off_the_event_loop(
    tiny_engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Schemas are compiled before admission (off the event loop) and kept in an LRU; a request that waited
    in the queue while other schemas pushed its own out gets it compiled again off the loop too, not
    inside ``generate`` on the loop, where it would stall every other reply."""
    import asyncio

    engine = TransformersEngine(
        tiny_engine.model, tiny_engine.tokenizer, tiny_engine.device, compile_mode=None, context_len=2048
    )
    grammars = engine._grammars
    monkeypatch.setattr(grammars, "_cache_size", 1)
    compiled, template = [], grammars._template

    def spy(schema: str) -> Any:
        fresh = schema not in grammars._compiled
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        result = template(schema)
        if fresh:
            compiled.append((json.loads(schema)["properties"], on_loop))
        return result

    monkeypatch.setattr(grammars, "_template", spy)
    reached, release = threading.Event(), threading.Event()
    step = engine._forward_step

    def held(*args: Any) -> Any:  # the first reply holds the one slot until released
        reached.set()
        release.wait(30)
        return step(*args)

    monkeypatch.setattr(engine, "_forward_step", held)
    first, second = ({"type": "object", "properties": {name: {"type": "integer"}}, "required": [name],
                      "additionalProperties": False} for name in ("a", "b"))  # fmt: skip
    cs = ChatStream(engine, num_of_concurrent_executions=1, max_queue_size=4, session_secret="s")
    with serve_in_thread(create_app(cs)) as url, httpx.Client(base_url=url, timeout=60) as client:
        replies: dict[str, httpx.Response] = {}

        def post(name: str, body: dict[str, Any]) -> threading.Thread:
            def send() -> None:
                replies[name] = client.post("/chat_stream", json={"format": "text", **body})

            thread = threading.Thread(target=send)
            thread.start()
            return thread

        def waiting(count: int) -> None:
            for _ in range(600):
                if client.get("/get_load").json()["waiting"] == count:
                    return
                time.sleep(0.05)  # the queue's length is read from the server: polled
            raise AssertionError(f"never {count} waiting")

        threads = [post("plain", {"user_input": "Hi", "generation_params": {"max_new_tokens": 4}})]
        assert reached.wait(30)
        threads.append(post("first", {"user_input": "A?", "json_schema": first}))
        waiting(1)
        threads.append(post("second", {"user_input": "B?", "json_schema": second}))  # evicts the first
        waiting(2)
        release.set()
        for thread in threads:
            thread.join(60)
    for name, schema in (("first", first), ("second", second)):
        assert replies[name].status_code == 200, replies[name].text
        jsonschema.validate(json.loads(replies[name].text), schema)
    # checked before admission (the second evicting the first), then each again once admitted (the LRU holds one)
    assert [props for props, _ in compiled] == [first["properties"], second["properties"]] * 2
    assert not [props for props, on_loop in compiled if on_loop], compiled
