"""One engine per GPU behind a pool (two on the CPU here): when one member's steps fail, only that member's
requests fail, the pool routes around it and says so, and the other member serves on; a model larger than its
GPU is refused before it is copied there, with what to do instead."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from test_engine_batching import GREEDY, collect, request, run

from chatstream_asgi import EngineError, EnginePool, MemberStatus, MockEngine
from chatstream_asgi.engines.transformers import TransformersEngine
from chatstream_asgi.engines.transformers.loading import load_model


def engines(model_dir: Path) -> list[TransformersEngine]:
    """Two engines on their own copies of the tiny model (each engine installs its attention on its model)."""
    built = []
    for _ in range(2):
        model, tokenizer, _ = load_model(str(model_dir), device="cpu", dtype="float32")
        built.append(TransformersEngine(model, tokenizer, "cpu", max_batch_size=4))
    return built


def break_steps(engine: TransformersEngine) -> None:
    """Every forward of ``engine`` raises, as a GPU that fails does."""

    def failing(*args: Any) -> Any:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    engine._forward_step = failing  # type: ignore[method-assign]
    engine._forward_prefill = failing  # type: ignore[method-assign]


async def outcome(pool: EnginePool, content: str) -> tuple[int, str]:
    """(the member that served it, its text or the error's class name)."""
    stream = pool.generate(request(content, GREEDY, rid=content))
    try:
        deltas, _ = await collect(stream)
    except EngineError as exc:
        return stream.index, type(exc).__name__
    return stream.index, "".join(deltas)


def test_a_failing_member_fails_only_its_own_requests_and_is_routed_around(tiny_model_dir: Path) -> None:
    healthy, failing = engines(tiny_model_dir)
    break_steps(failing)
    pool = EnginePool([healthy, failing], load_interval=None, cooldown=60.0)

    async def main() -> tuple[list[tuple[int, str]], list[tuple[int, str]], Any, str]:
        await pool.start()
        try:
            first = await asyncio.gather(*(outcome(pool, f"first {i}") for i in range(4)))
            status = pool.members()
            after = await asyncio.gather(*(outcome(pool, f"after {i}") for i in range(4)))
            alone = "".join((await collect(healthy.generate(request("after 0", GREEDY))))[0])
        finally:
            await pool.shutdown()
        return first, after, status, alone

    first, after, status, alone = run(main())
    assert sorted(index for index, _ in first) == [0, 0, 1, 1]  # the first four went round the two members
    assert all((text == "EngineError") == (index == 1) for index, text in first)  # only the failing one's failed
    assert [(s.healthy, s.where) for s in status] == [(True, "cpu"), (False, "cpu")]
    assert status[1].error.startswith("generation failed") and 0 < status[1].retry_in <= 60
    assert [index for index, _ in after] == [0, 0, 0, 0]  # then nothing goes to it while it is down
    assert after[0][1] == alone and all(text != "EngineError" for _, text in after)


def test_failures_in_a_row_lengthen_the_pause_and_a_served_reply_resets_it() -> None:
    members = [MockEngine(), MockEngine()]
    for member, where in zip(members, "ab", strict=True):
        member.where = where
    pool = EnginePool(members, load_interval=None, cooldown=10.0, max_cooldown=25.0)
    pauses = []
    for _ in range(3):
        pool._mark_failing(1, EngineError("boom"))
        pauses.append(pool.members()[1].retry_in)
        pool._mark_failing(1, EngineError("the same step's other row"))  # one failure, not two
        pool._down_until[1] = 0.0  # the pause is over: tried again, and it fails again
    assert [round(p) for p in pauses] == [10, 20, 25]  # doubled, capped at max_cooldown
    pool._mark_serving(1)
    pool._mark_failing(1, EngineError("boom"))
    assert round(pool.members()[1].retry_in) == 10
    assert pool.members()[0] == MemberStatus("a", healthy=True, active=0)


@pytest.mark.parametrize("status", [400, 422])
def test_a_remote_that_refuses_a_request_stays_in_the_pool(status: int) -> None:
    from chatstream_asgi.engines.remote import EngineRefused, _status_error

    error = _status_error("http://x/v1", status, b'{"error": {"message": "bad request"}}')
    assert isinstance(error, EngineRefused)  # the pool does not mark a member down for it


def test_a_model_larger_than_its_gpu_is_refused_with_the_way_out() -> None:
    from chatstream_asgi.engines.transformers.loading import ModelLoadError, check_fits

    check_fits("small", 10 * 2**30, "cuda:0", free=70 * 2**30, total=80 * 2**30)  # fits: nothing said
    with pytest.raises(ModelLoadError) as refused:
        check_fits("llama-70b", 141 * 2**30, "cuda:1", free=78 * 2**30, total=80 * 2**30)
    message = str(refused.value)
    assert "needs 141.0 GiB" in message and "cuda:1 has 78.0 GiB free of 80.0" in message
    assert "no tensor parallelism" in message and "--quantization fp8" in message and "--engine openai" in message
