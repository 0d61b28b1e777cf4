"""chatstream-asgi on a local Ray Serve instance, through Ray's HTTP proxy (``chatstream_asgi.integrations.ray_serve``).

Two apps: ``/chat`` has two replicas sharing sessions through Redis (1 slot, no queue each, so a request
that the router sends to a busy replica gets 429 at once); ``/one`` has one replica (1 slot, 1 queued)
for the four states, 429 with ``Retry-After`` and a rolling redeploy with a stream open. Ray needs
about 1.5 GB of memory and a minute on 2 cores: its own module, skipped without ``ray[serve]``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from servers import free_port

serve = pytest.importorskip("ray.serve")
ray = pytest.importorskip("ray")

from chatstream_asgi.integrations.ray_serve import chat_app, deployment_options, drain, shutdown  # noqa: E402

pytestmark = pytest.mark.ray

APPS = Path(__file__).parents[1] / "support" / "apps"
REPO = Path(__file__).parents[2]
TIMEOUT = 30.0
DEPLOY_TIMEOUT = 120.0  # serve.run, serve.delete: a replica start imports torch, over 30 s on 2 busy cores
SECRET = "ray-test-secret"
LONG = {"max_new_tokens": 2000}
# Ray's controller kills a proxy not ready within 5 s; a loaded 2-core machine can take longer to start one.
RAY_ENV = {"PYTHONPATH": "", "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60"}


def one_replica_app(max_new_tokens: int = 2000) -> Any:
    from ray_engines import announcing_app, long_mock

    return chat_app(
        functools.partial(long_mock, 0.05),
        session_secret=SECRET,
        num_replicas=1,
        longest_reply_s=10.0,
        num_of_concurrent_executions=1,
        max_queue_size=1,
        max_new_tokens=max_new_tokens,
        shutdown_timeout=2.0,
        app_factory=announcing_app,
        name="one",
    )


@pytest.fixture(scope="module")
def proxy(redis_url: str) -> Iterator[str]:
    """Ray (bounded to this module) with both apps deployed; yields the proxy's URL."""
    old_env = {name: os.environ.get(name) for name in RAY_ENV}
    sys_path = os.pathsep.join([str(APPS), str(REPO), old_env["PYTHONPATH"] or ""])
    env = {**RAY_ENV, "PYTHONPATH": sys_path}  # Ray's processes (started now) import ray_engines and the package
    os.environ.update(env)
    sys.path.insert(0, str(APPS))
    from ray_engines import long_mock

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        two = chat_app(
            functools.partial(long_mock, 0.05),
            session_secret=SECRET,
            session_store_url=redis_url,
            num_replicas=2,
            longest_reply_s=10.0,
            num_of_concurrent_executions=1,
            max_queue_size=0,
            max_new_tokens=2000,
            name="two",
        )
        serve.run(two, name="chat", route_prefix="/chat")
        serve.run(one_replica_app(), name="one", route_prefix="/one")
        yield f"http://127.0.0.1:{port}"
    finally:
        shutdown()
        ray.shutdown()
        sys.path.remove(str(APPS))
        for name, value in old_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class Lines:
    """The NDJSON events of a streamed response. Keep it while the stream must stay open: dropping a
    half-read ``iter_lines()`` generator closes httpx's connection."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.iter_lines()

    def next(self) -> dict[str, Any]:
        return json.loads(next(self._lines))

    def rest(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self._lines]


def metrics(client: httpx.Client, prefix: str) -> dict[str, float]:
    text = client.get(f"{prefix}/metrics").text
    return {m[1]: float(m[2]) for m in re.finditer(r'chatstream_completions_total\{state="(\w+)"\} (\S+)', text)}


def wait_for(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    """Poll ``condition`` (bounded): what Ray's processes do has no event to await from here."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        time.sleep(0.02)


def test_options_cover_the_app_limits_and_the_longest_reply() -> None:
    options = deployment_options(num_of_concurrent_executions=4, max_queue_size=16, longest_reply_s=60.0)
    assert options["max_ongoing_requests"] == 4 + 16 + 8
    assert options["graceful_shutdown_timeout_s"] >= 60.0 + 10.0
    with pytest.raises(ValueError, match="shared session store"):
        chat_app(dict, session_secret="s", num_replicas=2, longest_reply_s=1.0)
    with pytest.raises(ValueError, match="session_secret"):
        chat_app(dict, session_secret="", longest_reply_s=1.0)
    with pytest.raises(ValueError, match="request_timeout"):  # Ray would kill such a reply unreported
        chat_app(dict, session_secret="s", longest_reply_s=1.0, request_timeout=2.0)


def admitted(
    client: httpx.Client, body: dict[str, Any], not_on: str, streams: contextlib.ExitStack | None = None
) -> httpx.Response:
    """A ``/chat/chat_stream`` request (streamed when ``streams`` is given), sent again while the router still
    counts a just-finished request (Ray reports it completed a moment after its client closed it) on the busy
    replica ``not_on`` (bounded); a 429 may only come from that replica."""
    for _ in range(20):
        if streams is not None:
            response = streams.enter_context(client.stream("POST", "/chat/chat_stream", json=body))
        else:
            response = client.post("/chat/chat_stream", json=body)
        if response.status_code == 200:
            return response
        assert response.status_code == 429, response.read()
        assert response.headers["x-chatstream-replica"] == not_on
    raise AssertionError("never admitted")


def test_free_slot_routing_and_one_conversation_across_two_replicas(proxy: str) -> None:
    """Each replica has one slot and no queue. While one replica streams, every request must go to the
    other; a conversation started on one replica continues on the other with the same cookie."""
    hold = {"messages": [{"role": "user", "content": "hold the slot"}], "format": "ndjson", "generation_params": LONG}
    short = {"max_new_tokens": 3}
    with httpx.Client(base_url=proxy, timeout=TIMEOUT) as client, contextlib.ExitStack() as streams:
        first = streams.enter_context(client.stream("POST", "/chat/chat_stream", json=hold))
        first_events = Lines(first)
        assert first_events.next()["type"] == "delta"
        a = first.headers["x-chatstream-replica"]
        # The only free slot is on the other replica: the router must send the turn there at once.
        turn1 = client.post("/chat/chat_stream", json={"user_input": "first turn", "generation_params": short})
        assert turn1.status_code == 200, turn1.text
        b = turn1.headers["x-chatstream-replica"]
        assert b != a
        token = turn1.headers["x-session-id"]
        second = admitted(client, hold, a, streams)  # now hold b as well ...
        second_events = Lines(second)
        assert second_events.next()["type"] == "delta"
        assert second.headers["x-chatstream-replica"] == b
        first.close()  # ... and free a: the conversation must continue there
        assert client.cookies["chatstream_session"] == token  # the client sends the cookie turn 1 set
        turn2 = admitted(client, {"user_input": "second turn", "generation_params": short}, b)
        assert turn2.headers["x-chatstream-replica"] == a
        assert turn2.headers["x-session-id"] == token
        assert "set-cookie" not in turn2.headers  # the other replica accepted the cookie: the same secret
        second.close()
        contents = saved_turns(client, "/chat", 4)
    assert contents[0::2] == ["first turn", "second turn"]
    assert contents[1] == turn1.text and contents[3] == turn2.text


def saved_turns(client: httpx.Client, prefix: str, count: int) -> list[str]:
    """The session's history once it holds ``count`` messages (a turn is saved just after its last byte:
    bounded wait)."""
    contents: list[str] = []

    def saved() -> bool:
        contents[:] = [m["content"] for m in client.get(f"{prefix}/get_prompt").json()["messages"]]
        return len(contents) >= count

    wait_for(saved, f"{count} saved messages")
    return contents


def test_a_conversation_stays_on_its_replica_while_that_has_a_free_slot(proxy: str) -> None:
    """Session affinity (the replica that served the last turn holds the conversation's KV): each turn of a
    conversation goes to the replica of its last turn while that replica has a free slot; when it is full the
    turn goes to the other replica, continues there through Redis, and the conversation then stays there."""
    short = {"max_new_tokens": 3}
    hold = {"messages": [{"role": "user", "content": "hold"}], "format": "ndjson", "generation_params": LONG}

    def turn(client: httpx.Client, text: str, params: dict[str, Any] = short) -> str:
        response = client.post("/chat/chat_stream", json={"user_input": text, "generation_params": params})
        assert response.status_code == 200, response.text
        return response.headers["x-chatstream-replica"]

    with (
        httpx.Client(base_url=proxy, timeout=TIMEOUT) as client,
        httpx.Client(base_url=proxy, timeout=TIMEOUT) as other,
        contextlib.ExitStack() as streams,
    ):
        wait_until_idle(other, "/chat", replicas=2)
        # A first turn has no session yet: only its replica knows it, and reports it with its load. This one
        # streams for about three report periods, so the router has the report when the next turn comes.
        home = turn(client, "turn 1", {"max_new_tokens": 60})
        for number in (2, 3, 4):
            saved_turns(client, "/chat", 2 * number - 2)
            assert turn(client, f"turn {number}") == home
        # Another conversation takes the home replica's only slot (its first request may land on either).
        held = streams.enter_context(other.stream("POST", "/chat/chat_stream", json=hold))
        assert held.status_code == 200
        if (elsewhere := held.headers["x-chatstream-replica"]) != home:
            held_home = admitted(other, hold, elsewhere, streams)
            assert held_home.headers["x-chatstream-replica"] == home  # the only free slot
            held.close()
            held = held_home
        held_lines = Lines(held)  # kept: the stream stays open while it is
        assert held_lines.next()["type"] == "delta"
        saved_turns(client, "/chat", 8)
        moved = admitted(client, {"user_input": "turn 5", "generation_params": short}, home)
        away = moved.headers["x-chatstream-replica"]
        assert away != home
        held.close()
        saved_turns(client, "/chat", 10)
        assert turn(client, "turn 6") == away  # its last turn is there now
        saved_turns(client, "/chat", 12)
        # An API client sends the token in X-Session-Id, which is also Ray's session header.
        token = client.cookies["chatstream_session"]
        with httpx.Client(base_url=proxy, timeout=TIMEOUT, headers={"x-session-id": token}) as api_client:
            assert turn(api_client, "turn 7") == away
        contents = saved_turns(client, "/chat", 14)
    assert contents[0::2] == [f"turn {n}" for n in range(1, 8)]


def test_simultaneous_requests_take_both_replicas(proxy: str) -> None:
    """Two requests at once against two replicas of one slot each (no queue): both are admitted, one on each.
    Ray's default router probed both replicas concurrently, saw equal queues and sent both to one."""
    body = {"messages": [{"role": "user", "content": "at once"}], "format": "ndjson", "generation_params": LONG}
    for _ in range(3):
        with httpx.Client(base_url=proxy, timeout=TIMEOUT) as client:
            wait_until_idle(client, "/chat", replicas=2)  # earlier streams' slots are free again
            with contextlib.ExitStack() as streams:
                opened = open_together(client, streams, "/chat/chat_stream", body, 2)
                assert [response.status_code for response in opened] == [200, 200]
                assert len({response.headers["x-chatstream-replica"] for response in opened}) == 2


def wait_until_idle(client: httpx.Client, prefix: str, replicas: int) -> None:
    """Until ``replicas`` replicas have answered ``/get_load`` with no reply in progress (the router ranks idle
    ones first and rotates ties, so every replica answers once it is idle)."""
    idle: set[str] = set()

    def all_idle() -> bool:
        response = client.get(f"{prefix}/get_load")
        if response.json()["processing"] == 0:
            idle.add(response.headers["x-chatstream-replica"])
        return len(idle) >= replicas

    wait_for(all_idle, f"{replicas} idle replicas")


def open_together(
    client: httpx.Client, streams: contextlib.ExitStack, path: str, body: dict[str, Any], count: int
) -> list[httpx.Response]:
    """``count`` streamed requests sent at the same moment (threads behind a barrier)."""
    barrier = threading.Barrier(count)
    opened: list[httpx.Response] = []
    lock = threading.Lock()

    def open_one() -> None:
        barrier.wait(TIMEOUT)
        response = client.send(client.build_request("POST", path, json=body), stream=True)
        with lock:
            opened.append(response)
            streams.callback(response.close)

    threads = [threading.Thread(target=open_one) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    return opened


def test_four_states_and_429_through_the_proxy_then_a_rolling_redeploy(proxy: str) -> None:
    stream = {"messages": [{"role": "user", "content": "go"}], "format": "ndjson", "generation_params": LONG}
    with httpx.Client(base_url=proxy, timeout=TIMEOUT) as client:
        before = metrics(client, "/one")
        ok = client.post("/one/chat_stream", json={**stream, "generation_params": {"max_new_tokens": 4}})
        assert ok.status_code == 200 and json.loads(ok.text.splitlines()[-1])["state"] == "success"
        with client.stream("POST", "/one/chat_stream", json=stream) as left:
            assert Lines(left).next()["type"] == "delta"  # then the client leaves mid-stream
        with client.stream("POST", "/one/chat_stream", json=stream) as holder:
            holder_events = Lines(holder)
            assert holder_events.next()["type"] == "delta"
            with client.stream("POST", "/one/chat_stream", json=stream) as queued:
                queued_events = Lines(queued)
                assert queued_events.next() | {"estimated_wait_seconds": None} == {
                    "type": "queue",
                    "position": 1,
                    "estimated_wait_seconds": None,
                }
                over = client.post("/one/chat_stream", json=stream)
                assert over.status_code == 429
                assert over.json() == {"error": "too_many_requests"}
                assert int(over.headers["retry-after"]) >= 1
                assert client.get("/one/get_load").json()["waiting"] == 1  # control room: not stuck behind
            # The queued client left; the holder's stream goes on.
            assert holder_events.next()["type"] == "delta"
        failed = client.post("/one/chat_stream", json={"messages": [{"role": "user", "content": "fail"}]})
        assert failed.status_code == 500
        assert failed.json()["error"] == "unknown_error_occurred"
        counts = metrics(client, "/one")
        gained = {state: counts.get(state, 0) - before.get(state, 0) for state in counts}
        assert gained == {
            "success": 1,
            "client_disconnected_while_streaming": 2,
            "client_disconnected_before_streaming": 1,
            "unknown_error_occurred": 1,
        }

        # Rolling redeploy while a reply streams: the old replica drains it to the end.
        reply = {**stream, "generation_params": {"max_new_tokens": 60}}  # about 3 s at 0.05 s a token
        with client.stream("POST", "/one/chat_stream", json=reply) as open_stream:
            events_in = Lines(open_stream)
            assert events_in.next()["type"] == "delta"
            old = open_stream.headers["x-chatstream-replica"]
            redeploy = threading.Thread(
                target=serve.run, args=(one_replica_app(1000),), kwargs={"name": "one", "route_prefix": "/one"}
            )
            redeploy.start()
            events = events_in.rest()
        redeploy.join(DEPLOY_TIMEOUT)
        assert not redeploy.is_alive()
        assert events[-1]["type"] == "done" and events[-1]["state"] == "success"
        assert sum(1 for e in events if e["type"] == "delta") == 59
        after = client.post("/one/chat_stream", json={**stream, "generation_params": {"max_new_tokens": 2}})
        assert after.status_code == 200
        assert after.headers["x-chatstream-replica"] != old
        # The old replica stops (its ChatStream, closing, would answer a request routed to it 503, uncounted).
        wait_for(lambda: replica_states("one") == {"RUNNING": 1}, "the old replica of /one to stop", DEPLOY_TIMEOUT)


def replica_states(app: str) -> dict[str, int]:
    """How many replicas of ``app``'s deployments are in each state (Ray's ``serve.status()``)."""
    deployments = serve.status().applications[app].deployments.values()
    return {getattr(state, "value", state): n for d in deployments for state, n in d.replica_states.items() if n}


def test_a_client_that_leaves_while_sending_its_body_is_before_streaming(proxy: str, tmp_path: Path) -> None:
    """Ray's proxy sends ``http.disconnect``, makes ``receive`` raise and cancels the replica's task when the
    client leaves; whichever lands first, the request ends in ``client_disconnected_before_streaming``, counted once.
    (Which one lands first is a race here; tests/server/test_cancellation.py cancels deterministically.) The
    client leaves once the replica has its request (``announcing_app`` creates the file it names)."""
    arrived = tmp_path / "arrived"
    with httpx.Client(base_url=proxy, timeout=TIMEOUT) as client:
        host, port = proxy.removeprefix("http://").split(":")
        before = metrics(client, "/one").get("client_disconnected_before_streaming", 0)
        with socket.create_connection((host, int(port)), timeout=TIMEOUT) as conn:
            head = f"POST /one/chat_stream HTTP/1.1\r\nHost: x\r\nx-test-arrived: {arrived}\r\n"
            conn.sendall(f"{head}Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n".encode())
            conn.sendall(b'{"messages": [')
            wait_for(arrived.exists, "the request to reach the replica")

        def count() -> float:
            return metrics(client, "/one").get("client_disconnected_before_streaming", 0)

        wait_for(lambda: count() != before, "the state to be reported")
        assert count() == before + 1


def test_x_request_id_is_sent_once(proxy: str) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "generation_params": {"max_new_tokens": 1}}
    response = httpx.post(f"{proxy}/one/chat_stream", json=body, headers={"x-request-id": "abc-1"}, timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.headers.get_list("x-request-id") == ["abc-1"]
    plain = httpx.post(f"{proxy}/one/chat_stream", json=body, timeout=TIMEOUT)
    assert len(plain.headers.get_list("x-request-id")) == 1


def test_a_reply_longer_than_the_shutdown_budget_ends_with_an_error_frame(proxy: str, tmp_path: Path) -> None:
    """Ray waits for a stopping replica's open requests for ``graceful_shutdown_timeout_s``, then kills it, and
    runs the app's lifespan shutdown only after its requests ended: a reply that would stream past that budget
    must end by itself, with an error frame on the wire and one state, before the kill."""
    from ray_engines import long_mock, record_state

    states = tmp_path / "states"
    app = chat_app(
        functools.partial(long_mock, 0.05),
        session_secret=SECRET,
        longest_reply_s=2.0,
        num_of_concurrent_executions=1,
        max_queue_size=0,
        max_new_tokens=2000,  # 100 s at 0.05 s a token: far past Ray's budget of 2 + 1 + 5 s
        shutdown_timeout=1.0,
        callback=functools.partial(record_state, str(states)),
        name="short",
    )
    serve.run(app, name="short", route_prefix="/short")
    body = {"messages": [{"role": "user", "content": "go on"}], "format": "ndjson"}
    with httpx.Client(base_url=proxy, timeout=TIMEOUT) as client:
        with client.stream("POST", "/short/chat_stream", json=body) as response:
            events_in = Lines(response)
            assert events_in.next()["type"] == "delta"
            deleting = threading.Thread(target=serve.delete, args=("short",))
            deleting.start()  # Ray starts stopping the replica while the reply streams
            events = events_in.rest()
        deleting.join(DEPLOY_TIMEOUT)
    assert not deleting.is_alive()
    assert events[-1]["type"] == "error" and events[-1]["error"] == "deadline_exceeded"
    assert events[-1]["state"] == "unknown_error_occurred"
    assert states.read_text().splitlines() == ["unknown_error_occurred"]


def test_drain_lets_the_open_and_queued_replies_end_in_their_states(proxy: str, tmp_path: Path) -> None:
    """What Ctrl+C on examples/ray_serve_app.py runs (``shutdown``: ``drain``, then ``serve.shutdown()``, which
    alone kills Ray's proxies at once and cut 9 of 9 open streams, recorded as client disconnects): the
    replica stops while the proxy still carries its streams; the open reply and the queued one both end with
    their done frame, and the states say success."""
    from ray_engines import long_mock, record_state

    states = tmp_path / "states"
    app = chat_app(
        functools.partial(long_mock, 0.05),
        session_secret=SECRET,
        longest_reply_s=20.0,
        num_of_concurrent_executions=1,
        max_queue_size=1,
        max_new_tokens=30,  # about 1.5 s a reply
        shutdown_timeout=1.0,
        callback=functools.partial(record_state, str(states)),
        name="drained",
    )
    serve.run(app, name="drained", route_prefix="/drained")
    body = {"messages": [{"role": "user", "content": "go on"}], "format": "ndjson"}
    with httpx.Client(base_url=proxy, timeout=TIMEOUT) as client, contextlib.ExitStack() as streams:
        running = Lines(streams.enter_context(client.stream("POST", "/drained/chat_stream", json=body)))
        assert running.next()["type"] == "delta"
        queued = Lines(streams.enter_context(client.stream("POST", "/drained/chat_stream", json=body)))
        assert queued.next()["type"] == "queue"
        draining = threading.Thread(target=drain, args=("drained",))
        draining.start()  # Ray starts stopping the replica while one reply streams and one waits
        ends = [running.rest()[-1], queued.rest()[-1]]
        draining.join(DEPLOY_TIMEOUT)
    assert not draining.is_alive() and "drained" not in serve.status().applications
    assert [(end["type"], end["state"]) for end in ends] == [("done", "success")] * 2
    assert states.read_text().splitlines() == ["success", "success"]
