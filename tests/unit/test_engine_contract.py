"""The engine contract, declared once (:class:`chatstream_asgi.Engine`): every engine of the package has every
member, and a pool of engines forwards each one, so that nothing about the model is lost behind a pool
(what ``serve --devices all`` builds)."""

from __future__ import annotations

import inspect
from typing import Any

import httpx
import pytest

from chatstream_asgi import ChatStream, Engine, EnginePool, MockEngine, OpenAIEngine
from chatstream_asgi.web.app import create_app

pytestmark = pytest.mark.anyio


def contract() -> set[str]:
    """Every public member :class:`Engine` declares: its attributes and its methods."""
    declared = set(inspect.get_annotations(Engine)) | {
        name for name, value in vars(Engine).items() if callable(value) and not name.startswith("_")
    }
    return {name for name in declared if not name.startswith("_")}


def test_the_contract_holds_what_the_service_uses() -> None:
    used = {"default_generation_params", "kv_cache_usage", "max_batch_size", "release_session", "probe_load"}
    assert used | {"prefix_hit_tokens", "prefill_tokens", "render_prompt", "count_tokens", "generate"} <= contract()


@pytest.mark.parametrize("kind", ["mock", "remote", "pool", "transformers"])
def test_every_engine_of_the_package_has_every_member(kind: str, request: pytest.FixtureRequest) -> None:
    engines: dict[str, Any] = {
        "mock": lambda: MockEngine(),
        "remote": lambda: OpenAIEngine("http://127.0.0.1:9/v1", "m"),
        "pool": lambda: EnginePool([MockEngine(), MockEngine()]),
        "transformers": lambda: request.getfixturevalue("tiny_engine"),
    }
    engine = engines[kind]()
    assert {name for name in contract() if not hasattr(engine, name)} == set()


def members(**values: Any) -> list[MockEngine]:
    """Two mock engines that report ``values`` (what a model-serving engine knows of its model and cache)."""
    engines = [MockEngine(model_name="m"), MockEngine(model_name="m")]
    for engine in engines:
        for name, value in values.items():
            setattr(engine, name, value)
    return engines


async def test_a_pool_keeps_the_models_sampling_defaults() -> None:
    """Behind a pool, the model's recommended sampling (greedy here) stays the server's default."""
    suited = {"temperature": 0.0, "top_p": 0.9, "repetition_penalty": 1.2}
    cs = ChatStream(EnginePool(members(default_generation_params=suited)), session_secret="s")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(create_app(cs)), base_url="http://test") as c:
        params = (await c.get("/get_generation_params")).json()
    assert (params["temperature"], params["top_p"], params["repetition_penalty"]) == (0.0, 0.9, 1.2)


async def test_a_pool_reports_its_members_cache_in_the_metrics() -> None:
    pool = EnginePool(members(kv_cache_usage=0.5, prefix_hit_tokens=3, prefill_tokens=7, max_batch_size=4))
    metrics = ChatStream(pool, session_secret="s").metrics.render().decode()
    assert "chatstream_kv_cache_usage_ratio 0.5" in metrics
    assert "chatstream_prefix_cache_hit_tokens_total 6.0" in metrics
    assert "chatstream_prefill_tokens_total 14.0" in metrics
    assert pool.max_batch_size == 8


async def test_a_pool_frees_a_cleared_conversation_on_every_member() -> None:
    released: list[tuple[int, str]] = []
    engines = members()
    for number, engine in enumerate(engines):
        engine.release_session = lambda key, number=number: released.append((number, key)) or 0  # type: ignore[method-assign]
    cs = ChatStream(EnginePool(engines), session_secret="s")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(create_app(cs)), base_url="http://test") as c:
        session = (await c.post("/chat_stream", json={"user_input": "hi"})).headers["x-session-id"]
        await c.post("/clear_context", headers={"x-session-id": session})
    assert sorted(number for number, _ in released) == [0, 1] and len({key for _, key in released}) == 1
