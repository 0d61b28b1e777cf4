"""A pool with a failing member, through HTTP: the failing member's request ends in
``unknown_error_occurred`` with a JSON 500, the pool routes around it, and ``/get_load`` and
``/metrics`` say which member is down and why; the healthy member serves every later request."""

from __future__ import annotations

import json

from starlette.testclient import TestClient

from chatstream_asgi import ChatStream, EngineError, EnginePool, MockEngine, MockParams
from chatstream_asgi.web.app import create_app


def test_a_failing_member_is_shown_down_and_routed_around() -> None:
    healthy = MockEngine(MockParams(type="echo"))
    failing = MockEngine(MockParams(fail_after_tokens=0))  # every generation fails, as on a failing GPU
    healthy.where, failing.where = "cuda:0", "cuda:1"
    states: list[str] = []
    pool = EnginePool([healthy, failing], load_interval=None, cooldown=60.0)
    cs = ChatStream(pool, session_secret="s", callback=lambda request, state: states.append(str(state)))
    body = {"messages": [{"role": "user", "content": "hi"}]}
    with TestClient(create_app(cs)) as client:
        assert [m["healthy"] for m in client.get("/get_load").json()["engines"]] == [True, True]
        replies = [client.post("/chat_stream", json=body) for _ in range(6)]
        load = client.get("/get_load").json()
        metrics = client.get("/metrics").text
    failed = [r for r in replies if r.status_code != 200]
    assert len(failed) == 1 and failed[0].status_code == 500 and "error" in failed[0].json()
    assert [r.text for r in replies if r.status_code == 200] == [replies[0].text] * 5  # every later one on cuda:0
    assert "hi" in replies[0].text
    assert sorted(states) == ["success"] * 5 + ["unknown_error_occurred"]
    first, second = load["engines"]
    assert first == {"where": "cuda:0", "healthy": True, "active": 0, "retry_in": 0.0, "error": ""}
    assert second["where"] == "cuda:1" and not second["healthy"] and 0 < second["retry_in"] <= 60
    assert "mock engine failure" in second["error"]
    assert 'chatstream_engine_healthy{member="0",where="cuda:0"} 1.0' in metrics
    assert 'chatstream_engine_healthy{member="1",where="cuda:1"} 0.0' in metrics
    assert json.dumps(load)  # the whole report is JSON


def test_a_single_engine_reports_no_members() -> None:
    with TestClient(create_app(ChatStream(MockEngine(), session_secret="s"))) as client:
        assert "engines" not in client.get("/get_load").json()
        assert "chatstream_engine_" not in client.get("/metrics").text


def test_credentials_in_a_members_url_are_never_shown() -> None:
    member = MockEngine(MockParams(fail_after_tokens=0))
    member.where = "http://user:s3cret@10.0.0.5:8000/v1"
    pool = EnginePool([member, MockEngine()], load_interval=None, cooldown=60.0)
    pool._mark_failing(0, EngineError("no response from http://user:s3cret@10.0.0.5:8000/v1/chat/completions"))
    with TestClient(create_app(ChatStream(pool, session_secret="s"))) as client:
        shown = client.get("/get_load").text + client.get("/metrics").text
    assert "s3cret" not in shown and "user:" not in shown
    assert "http://10.0.0.5:8000/v1" in shown and "no response from http://10.0.0.5:8000" in shown
