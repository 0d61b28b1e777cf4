"""Overload: ten times more clients than slots plus queue places, all at once, on each real server.

Every admitted reply waits at the engine's gate (before its first token) until every other client
has its answer, so the split is exact whatever the machine's speed: slots plus queue places are
admitted, the rest get a 429 JSON at once; then the gate opens and every admitted reply finishes
with ``success``. Nobody waits forever (each client has a watchdog). Before the gate opens, more
clients probe the full server, a few at a time. The 429 latencies (connect to response read) of
the burst and of the probes are printed as p50/p99; only outcomes are asserted.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import httpx
import pytest
from faulty_engine import fault
from raw_http import Response, chat_request, connect
from servers import SERVERS, running
from test_disconnect_fuzz import full_reply

SLOTS, QUEUE = 2, 4
CLIENTS = 10 * (SLOTS + QUEUE)
TOKENS = 20
PROBES, PROBING_CLIENTS = 200, 4
WATCHDOG = 30.0
APP_ENV = {"CS_CONCURRENCY": str(SLOTS), "CS_QUEUE": str(QUEUE), "CS_FIRST_TOKEN": "0", "CS_PER_TOKEN": "0.001"}


async def one(port: int, rid: str, rejected: asyncio.Queue[float]) -> Response:
    head, body = chat_request(rid, {"user_input": fault("gate", 0), "generation_params": {"max_new_tokens": TOKENS}})
    started = time.perf_counter()
    reader, writer = await connect(port)
    try:
        writer.write(head + body)
        response = Response(reader, "text")
        await response.read_head()
        await response.read_all()
        if response.status == 429:
            rejected.put_nowait(time.perf_counter() - started)
        return response
    finally:
        writer.close()


def ms(values: list[float], q: int) -> str:
    """The ``q``-th percentile of ``values`` (seconds), in milliseconds."""
    return f"{statistics.quantiles(values, n=100, method='inclusive')[q - 1] * 1000:.1f}"


@pytest.mark.parametrize("tenants", [0, 4], ids=["one-tenant", "4-tenants"])
@pytest.mark.parametrize("server_name", SERVERS)
def test_ten_times_more_clients_than_room(server_name: str, tenants: int) -> None:
    with running(server_name, "fuzz_app:app", {**APP_ENV, "CS_TENANTS": str(tenants)}) as srv:

        async def main() -> tuple[list[Response], list[float], list[float], dict, dict]:
            rejected: asyncio.Queue[float] = asyncio.Queue()
            tasks = [asyncio.ensure_future(one(srv.port, f"load-{i}", rejected)) for i in range(CLIENTS)]
            burst = [await asyncio.wait_for(rejected.get(), WATCHDOG) for _ in range(CLIENTS - SLOTS - QUEUE)]
            probed: asyncio.Queue[float] = asyncio.Queue()
            for start in range(0, PROBES, PROBING_CLIENTS):
                probes = (one(srv.port, f"probe-{i}", probed) for i in range(start, start + PROBING_CLIENTS))
                assert all(r.status == 429 for r in await asyncio.wait_for(asyncio.gather(*probes), WATCHDOG))
            async with httpx.AsyncClient(base_url=srv.url, timeout=10.0) as c:
                load = (await c.get("/get_load")).json()
                (await c.post("/_fuzz/gate")).raise_for_status()
                responses = await asyncio.wait_for(asyncio.gather(*tasks), WATCHDOG)
                while len((records := (await c.get("/_fuzz/records")).json())["callbacks"]) < SLOTS + QUEUE:
                    await asyncio.sleep(0.01)  # callbacks come after the last byte (bounded by the watchdog)
            return responses, burst, [probed.get_nowait() for _ in range(PROBES)], load, records

        responses, burst, probes, load, records = asyncio.run(asyncio.wait_for(main(), 3 * WATCHDOG))

    print(f"\n{server_name}: {SLOTS} slots + {QUEUE} queue places; 429 latency, p50 / p99: "
          f"burst of {CLIENTS} clients {ms(burst, 50)} / {ms(burst, 99)} ms, "
          f"{PROBES} probes of the full server {ms(probes, 50)} / {ms(probes, 99)} ms")  # fmt: skip
    assert (load["processing"], load["waiting"]) == (SLOTS, QUEUE)  # full while the 429s went out
    statuses = sorted(r.status for r in responses)
    assert statuses == [200] * (SLOTS + QUEUE) + [429] * (CLIENTS - SLOTS - QUEUE)
    for response in responses:
        if response.status == 429:
            assert response.json()["error"] == "too_many_requests"
        else:
            assert response.ended and response.text == full_reply(TOKENS)
    assert sorted(records["callbacks"].values()) == [[["success", full_reply(TOKENS)]]] * (SLOTS + QUEUE)
    rejections = [log for log in records["logs"].values() if log == ["rejected: queue_full"]]
    assert len(rejections) == CLIENTS - SLOTS - QUEUE + PROBES
