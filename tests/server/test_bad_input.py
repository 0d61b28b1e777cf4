"""Bad input, tried as an attacker would: property tests (hypothesis) on every JSON endpoint.

Every generated request is invalid somewhere: a wrong type at some field, an out-of-range or
absurd number, NaN/Infinity, a huge or deeply nested value, invalid UTF-8, a lone surrogate, a
body that is not an object, plus unknown fields, odd content types, odd headers and session
tokens around it. Each must get a 4xx JSON error in the endpoint's own shape, be counted once in
``chatstream_rejected_total``, never reach the engine (an engine double records every call), and
leave the server serving. The bulk runs in-process through the raw ASGI harness; a smaller set
goes over raw sockets to a real server (hypercorn) for what only a wire can carry: a lying
Content-Length, chunked bodies over the limit, odd header bytes.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from asgi_harness import Receive, Send, http_scope, not_found
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from live_server import serve_in_thread

from chatstream_asgi import ChatStream, ChatStreamMiddleware, GenerationRequest, GenerationStream, MockEngine
from chatstream_asgi.protocols.chat import MAX_INT_DIGITS, MAX_JSON_DEPTH
from chatstream_asgi.protocols.framing import FORMATS

MAX_BODY = 64 * 1024
MAX_NEW_TOKENS = 64
WATCHDOG = 5.0
"""Bound on one rejection (a loaded 2-core machine included); the figures README reports are the
latencies measured here, printed by the tests (``pytest -s``)."""

SETTINGS = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)


class RecordingEngine(MockEngine):
    """The mock engine, recording every generation it is asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[GenerationRequest] = []

    def generate(self, request: GenerationRequest) -> GenerationStream:
        self.calls.append(request)
        return super().generate(request)


@dataclass
class Target:
    """A ChatStream behind the middleware, with what the properties read of it."""

    engine: RecordingEngine = field(default_factory=RecordingEngine)
    latencies: list[float] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.cs = ChatStream(self.engine, session_secret="s", max_new_tokens=MAX_NEW_TOKENS)
        self.app = ChatStreamMiddleware(not_found, self.cs, max_body_size=MAX_BODY)

    def rejected(self, reason: str) -> float:
        return self.cs.metrics.registry.get_sample_value("chatstream_rejected_total", {"reason": reason}) or 0.0

    async def exchange(self, path: str, body: bytes, headers: list[tuple[bytes, bytes]], method: str = "POST") -> Send:
        send = Send()
        started = time.monotonic()
        with anyio.fail_after(WATCHDOG):
            await self.app(http_scope(path, method=method, body=body, headers=headers), Receive(body), send)
        self.latencies.append(time.monotonic() - started)
        return send


@pytest.fixture(scope="module")
def portal() -> Iterator[BlockingPortal]:
    """One event loop for the module: hypothesis runs sync tests, the app runs here."""
    with start_blocking_portal(backend="asyncio") as portal:
        yield portal


@pytest.fixture(scope="module")
def target(portal: BlockingPortal) -> Iterator[Target]:
    target = Target()
    yield target
    if target.latencies:
        ordered = sorted(target.latencies)
        p50, p99 = ordered[len(ordered) // 2], ordered[int(len(ordered) * 0.99)]
        print(f"\n{len(ordered)} bad requests in-process: p50 {p50 * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms")
    # The server keeps serving: a valid request after all of them is answered and reaches the engine.
    before = len(target.engine.calls)
    body = json.dumps({"user_input": "still there?"}).encode()
    send = portal.call(target.exchange, "/chat_stream", body, [])
    assert send.status == 200 and send.complete and len(target.engine.calls) == before + 1


def check_rejected(target: Target, portal: BlockingPortal, path: str, body: bytes, headers: Any = ()) -> None:
    """The property: a counted 4xx JSON error in the endpoint's shape, and no generation."""
    headers = list(headers)
    calls = len(target.engine.calls)
    reason = "body_too_large" if len(body) > MAX_BODY else "invalid_request"
    counted = target.rejected(reason)
    send = portal.call(target.exchange, path, body, headers)
    assert send.status == (413 if reason == "body_too_large" else 400), (send.status, send.body[:300])
    assert send.headers["content-type"] == "application/json"
    error = send.json()["error"]
    code = error["code"] if path.startswith("/v1/") else error
    assert code == reason, send.body[:300]
    assert target.rejected(reason) == counted + 1
    assert len(target.engine.calls) == calls


# -- values ------------------------------------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def not_a(*types: type) -> st.SearchStrategy[Any]:
    """JSON values of none of ``types`` (bool counts as its own type, never as int)."""

    def ok(value: Any) -> bool:
        if isinstance(value, bool):
            return bool not in types
        return not isinstance(value, types)

    return json_values.filter(ok)


def number_outside(lo: float, hi: float, *, lo_open: bool = False) -> st.SearchStrategy[Any]:
    below = st.floats(max_value=lo if lo_open else lo - 1e-9, allow_nan=False, allow_infinity=False)
    above = st.floats(min_value=hi, exclude_min=True, allow_nan=False, allow_infinity=False)
    return st.one_of(below, above, not_a(int, float))


PARAMS_INVALID: dict[str, st.SearchStrategy[Any]] = {
    "temperature": number_outside(0.0, 5.0),
    "top_p": number_outside(0.0, 1.0, lo_open=True),
    "repetition_penalty": number_outside(0.0, 10.0, lo_open=True),
    "top_k": st.one_of(st.integers(max_value=-1), not_a(int)),
    "max_new_tokens": st.one_of(st.integers(max_value=0), st.integers(min_value=MAX_NEW_TOKENS + 1), not_a(int)),
    "seed": st.one_of(st.integers(max_value=-1), st.integers(min_value=2**63), not_a(int, type(None))),
    "stop": st.one_of(
        st.just(""),
        st.lists(st.text(max_size=5), min_size=17, max_size=20),
        st.lists(not_a(str), min_size=1, max_size=3),
        not_a(str, list),
    ),
}
SESSION_PARAMS = ("temperature", "top_k", "top_p", "repetition_penalty")
CHAT_FIELDS = {"user_input", "messages", "regenerate", "generation_params", "format"}
OPENAI_FIELDS = {"model", "messages", "stream", "stream_options", "n", "max_tokens", "max_completion_tokens"}
OPENAI_FIELDS |= {"temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop"}


def unknown_fields(known: set[str]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.text(max_size=10).filter(lambda k: k not in known), json_values, max_size=3)


def invalid_message() -> st.SearchStrategy[Any]:
    return st.one_of(
        not_a(dict),
        st.fixed_dictionaries({"role": not_a(str) | st.text().filter(lambda r: r not in ROLES), "content": st.text()}),
        st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": not_a(str, list)}),
    )


ROLES = {"system", "user", "assistant", "developer"}  # developer: OpenAI's name for system


def invalid_messages() -> st.SearchStrategy[Any]:
    valid = st.fixed_dictionaries({"role": st.just("user"), "content": st.text(max_size=10)})
    mixed = st.tuples(st.lists(valid, max_size=2), invalid_message(), st.lists(valid, max_size=2))
    return st.one_of(st.just([]), not_a(list), mixed.map(lambda t: [*t[0], t[1], *t[2]]))


@st.composite
def bad_chat_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """A /chat_stream body with one field made invalid, and maybe unknown fields around it."""
    body: dict[str, Any] = {"user_input": draw(st.text(max_size=30))}
    broken = draw(st.sampled_from(["user_input", "regenerate", "format", "messages", "both", "params", "param"]))
    if broken == "user_input":
        body["user_input"] = draw(not_a(str))
    elif broken == "regenerate":
        body["regenerate"] = draw(not_a(bool))
    elif broken == "format":
        body["format"] = draw(not_a(str, type(None)) | st.text().filter(lambda f: f not in FORMATS))
    elif broken == "messages":
        del body["user_input"]
        body["messages"] = draw(invalid_messages())
    elif broken == "both":
        body["messages"] = [{"role": "user", "content": "x"}]
    elif broken == "params":
        body["generation_params"] = draw(not_a(dict, type(None)))
    else:
        name = draw(st.sampled_from(sorted(PARAMS_INVALID)))
        body["generation_params"] = {name: draw(PARAMS_INVALID[name])}
    extra = draw(unknown_fields(CHAT_FIELDS))
    return {**extra, **body}


@st.composite
def bad_openai_bodies(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "mock", "messages": [{"role": "user", "content": draw(st.text(max_size=20))}]}
    broken = draw(st.sampled_from(["model", "messages", "stream", "stream_options", "n", "param", "max_tokens"]))
    if broken == "model":
        body["model"] = draw(not_a(str, type(None)))
    elif broken == "messages":
        body["messages"] = draw(invalid_messages() | st.none())
    elif broken == "stream":
        body["stream"] = draw(not_a(bool).filter(bool))  # a falsy value counts as false
    elif broken == "stream_options":
        body["stream_options"] = draw(not_a(dict).filter(bool) | st.fixed_dictionaries({"include_usage": not_a(bool)}))
    elif broken == "n":
        body["n"] = draw(json_values.filter(lambda n: n not in (None, 1)))
    elif broken == "max_tokens":
        body[draw(st.sampled_from(["max_tokens", "max_completion_tokens"]))] = draw(
            st.integers(min_value=MAX_NEW_TOKENS + 1) | st.integers(max_value=0)
        )
    else:
        name = draw(st.sampled_from(sorted(set(PARAMS_INVALID) - {"max_new_tokens"})))
        body[name] = draw(PARAMS_INVALID[name].filter(lambda v: v is not None))
    return {**draw(unknown_fields(OPENAI_FIELDS)), **body}


@st.composite
def bad_session_params(draw: st.DrawFn) -> Any:
    broken = draw(st.sampled_from(["value", "unknown", "not_object"]))
    if broken == "not_object":
        return draw(not_a(dict))
    body = draw(st.dictionaries(st.sampled_from(SESSION_PARAMS), st.none(), max_size=2))
    if broken == "unknown":
        body[draw(st.text(max_size=10).filter(lambda k: k not in SESSION_PARAMS))] = draw(json_values)
    else:
        name = draw(st.sampled_from(SESSION_PARAMS))
        body[name] = draw(PARAMS_INVALID[name].filter(lambda v: v is not None))
    return body


@st.composite
def bad_feedback(draw: st.DrawFn) -> Any:
    broken = draw(st.sampled_from(["message_id", "feedback", "not_object"]))
    if broken == "not_object":
        return draw(not_a(dict))
    body: dict[str, Any] = {"message_id": draw(st.text(min_size=1, max_size=32)), "feedback": "like"}
    if broken == "message_id":
        body["message_id"] = draw(not_a(str) | st.just(""))
    else:
        body["feedback"] = draw(not_a(str, type(None)) | st.text().filter(lambda f: f not in ("like", "dislike")))
    return {**draw(unknown_fields({"message_id", "feedback"})), **body}


# -- bytes -------------------------------------------------------------------------------------


def encode(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


@st.composite
def corrupted(draw: st.DrawFn, valid: dict[str, Any]) -> bytes:
    """A body that is a *valid* request broken at the byte or JSON level."""
    raw = encode(valid)
    kind = draw(
        st.sampled_from(
            ["utf8", "surrogate", "deep", "huge_int", "constant", "overflow", "truncated", "not_object", "too_large"]
        )
    )
    if kind == "utf8":
        at = draw(st.integers(0, len(raw)))
        bad = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80"]))
        return raw[:at] + bad + raw[at:]
    if kind == "surrogate":
        text = f"\\u{draw(st.integers(0xD800, 0xDFFF)):04x}".encode()
        member = b'"' + text + b'": 1' if draw(st.booleans()) else b'"k": "a' + text + b'b"'
        return add_member(raw, member)
    if kind == "deep":
        depth = draw(st.integers(MAX_JSON_DEPTH, 50_000))
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
        return add_member(raw, b'"nested": ' + opener * depth + b"1" + closer * depth)
    if kind == "huge_int":
        return add_member(raw, b'"n": ' + b"9" * draw(st.integers(MAX_INT_DIGITS + 1, 20_000)))
    if kind == "constant":
        return add_member(raw, b'"x": ' + draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity"])))
    if kind == "overflow":
        return add_member(raw, b'"x": ' + draw(st.sampled_from([b"1e999", b"-1e400", b"123.4e5000"])))
    if kind == "truncated":  # never empty: an empty body is {} on the session endpoints
        return raw[: draw(st.integers(1, len(raw) - 1))]
    if kind == "not_object":
        return encode(draw(not_a(dict)))
    return add_member(raw, b'"pad": "' + b"x" * MAX_BODY + b'"')


def add_member(raw: bytes, member: bytes) -> bytes:
    """``raw`` (a JSON object) with one more member, first."""
    return b"{" + member + (b"}" if raw == b"{}" else b", " + raw[1:])


VALID = {
    "/chat_stream": {"user_input": "hello"},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hello"}]},
    "/set_generation_params": {"temperature": 0.5},
    "/set_feedback": {"message_id": "abc", "feedback": "like"},
    "/clear_context": {},
}

odd_content_types = st.sampled_from(
    [
        None,
        b"application/json",
        b"text/plain",
        b"application/x-www-form-urlencoded",
        b"multipart/form-data",
        b"\xff\xfe",
    ]
)
odd_tokens = st.one_of(
    st.binary(max_size=200).filter(lambda b: b"\r" not in b and b"\n" not in b),
    st.text(max_size=60).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.just("café.signature".encode()),
)


@st.composite
def odd_headers(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    headers = []
    content_type = draw(odd_content_types)
    if content_type is not None:
        headers.append((b"content-type", content_type))
    if draw(st.booleans()):
        headers.append((b"x-session-id", draw(odd_tokens)))
    if draw(st.booleans()):
        headers.append((b"cookie", b"chatstream_session=" + draw(odd_tokens)))
    if draw(st.booleans()):
        headers.append((b"x-request-id", draw(odd_tokens)))
    return headers


# -- the properties, in-process ------------------------------------------------------------------


@settings(SETTINGS, max_examples=700)
@given(body=bad_chat_bodies(), headers=odd_headers())
def test_chat_stream_rejects_every_invalid_field(
    target: Target, portal: BlockingPortal, body: Any, headers: Any
) -> None:
    check_rejected(target, portal, "/chat_stream", encode(body), headers)


@settings(SETTINGS, max_examples=600)
@given(body=bad_openai_bodies(), headers=odd_headers())
def test_chat_completions_rejects_every_invalid_field(
    target: Target, portal: BlockingPortal, body: Any, headers: Any
) -> None:
    check_rejected(target, portal, "/v1/chat/completions", encode(body), headers)


@settings(SETTINGS, max_examples=300)
@given(body=bad_session_params(), headers=odd_headers())
def test_set_generation_params_rejects_every_invalid_field(
    target: Target, portal: BlockingPortal, body: Any, headers: Any
) -> None:
    check_rejected(target, portal, "/set_generation_params", encode(body), headers)


@settings(SETTINGS, max_examples=300)
@given(body=bad_feedback(), headers=odd_headers())
def test_set_feedback_rejects_every_invalid_field(
    target: Target, portal: BlockingPortal, body: Any, headers: Any
) -> None:
    check_rejected(target, portal, "/set_feedback", encode(body), headers)


@settings(SETTINGS, max_examples=1200)
@given(data=st.data(), path=st.sampled_from(sorted(VALID)), headers=odd_headers())
def test_every_json_endpoint_rejects_broken_bytes(
    target: Target, portal: BlockingPortal, data: st.DataObject, path: str, headers: Any
) -> None:
    check_rejected(target, portal, path, data.draw(corrupted(VALID[path])), headers)


@settings(SETTINGS, max_examples=200)
@given(path=st.sampled_from(["/get_generation_params", "/get_prompt", "/clear_context"]), headers=odd_headers())
def test_odd_session_tokens_start_a_fresh_session(
    target: Target, portal: BlockingPortal, path: str, headers: Any
) -> None:
    method = "POST" if path == "/clear_context" else "GET"
    calls = len(target.engine.calls)
    send = portal.call(target.exchange, path, b"", headers, method)
    assert send.status == 200, send.body[:300]
    token = send.headers["x-session-id"]
    assert token.isascii() and target.cs.sessions.verify(token) is not None
    assert len(target.engine.calls) == calls


# -- over the wire: lying Content-Length, chunked bodies over the limit, odd header bytes ---------


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[Target, int]]:
    target = Target()
    with serve_in_thread(target.app) as url:
        yield target, int(url.rsplit(":", 1)[1])
    assert target.engine.calls == []


def roundtrip(port: int, request: bytes, *, shutdown: bool = False) -> tuple[int, bytes]:
    """Send ``request`` raw; the status and body of the first response."""
    with socket.create_connection(("127.0.0.1", port), timeout=WATCHDOG) as sock:
        sock.sendall(request)
        if shutdown:
            sock.shutdown(socket.SHUT_WR)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        head, _, rest = received.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(
            (
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            None,
        )
        while length is not None and len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        return status, rest if length is None else rest[:length]


def request_head(path: str, headers: list[tuple[bytes, bytes]]) -> bytes:
    lines = [b"POST " + path.encode() + b" HTTP/1.1", b"Host: test", *(k + b": " + v for k, v in headers)]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def wire_header_values() -> st.SearchStrategy[bytes]:
    return st.binary(min_size=1, max_size=300).filter(lambda b: not set(b) & {0, 10, 13} and b.strip() == b)


@settings(SETTINGS, max_examples=60)
@given(path=st.sampled_from(sorted(VALID)), data=st.data())
def test_a_content_length_that_lies_short_is_a_4xx(server: tuple[Target, int], path: str, data: st.DataObject) -> None:
    """A valid request that declares fewer bytes than it sends: the app reads a prefix of an object."""
    _, port = server
    body = encode({**data.draw(unknown_fields(set(VALID[path]))), **VALID[path]})
    declared = data.draw(st.integers(1, len(body) - 1))
    status, reply = roundtrip(port, request_head(path, [(b"Content-Length", str(declared).encode())]) + body)
    assert status == 400
    assert json.loads(reply)  # our JSON error: the prefix is no JSON object


@settings(SETTINGS, max_examples=60)
@given(path=st.sampled_from(sorted(VALID)), size=st.integers(MAX_BODY + 1, 2 * MAX_BODY), chunk=st.integers(64, 20_000))
def test_a_chunked_body_over_the_limit_is_a_counted_413(
    server: tuple[Target, int], path: str, size: int, chunk: int
) -> None:
    target, port = server
    counted = target.rejected("body_too_large")
    payload = b"x" * size
    chunks = b"".join(
        b"%x\r\n" % len(payload[i : i + chunk]) + payload[i : i + chunk] + b"\r\n" for i in range(0, size, chunk)
    )
    request = request_head(path, [(b"Transfer-Encoding", b"chunked")]) + chunks + b"0\r\n\r\n"
    status, reply = roundtrip(port, request)
    assert status == 413
    error = json.loads(reply)["error"]
    assert (error["code"] if path.startswith("/v1/") else error) == "body_too_large"
    assert target.rejected("body_too_large") == counted + 1


@settings(SETTINGS, max_examples=60)
@given(
    path=st.sampled_from(sorted(VALID)),
    declared=st.sampled_from([str(MAX_BODY + 1).encode(), b"99999999999999999999", b"-1", b"abc", b"1e3", b"0x10"]),
)
def test_an_absurd_content_length_is_a_4xx(server: tuple[Target, int], path: str, declared: bytes) -> None:
    _, port = server
    status, _ = roundtrip(port, request_head(path, [(b"Content-Length", declared)]) + b"{}", shutdown=True)
    assert 400 <= status < 500


@settings(SETTINGS, max_examples=80)
@given(
    path=st.sampled_from(sorted(VALID)),
    name=st.sampled_from([b"X-Session-Id", b"Cookie", b"X-Request-Id", b"Content-Type", b"X-Odd", b"Authorization"]),
    value=wire_header_values(),
)
def test_odd_header_bytes_with_a_bad_body_are_a_counted_400(
    server: tuple[Target, int], path: str, name: bytes, value: bytes
) -> None:
    target, port = server
    counted = target.rejected("invalid_request")
    body = b'{"broken": '
    headers = [(name, value), (b"Content-Length", str(len(body)).encode())]
    status, reply = roundtrip(port, request_head(path, headers) + body)
    if status == 400 and reply.startswith(b"{"):
        assert target.rejected("invalid_request") == counted + 1
    else:  # the server itself refused the header bytes before the app saw the request
        assert 400 <= status < 500 and target.rejected("invalid_request") == counted
