"""The app of the disconnect fuzz and the overload test (``fuzz_app:app``, ``tests/support/apps`` on the path).

One ChatStream over a fast mock engine (``CS_CONCURRENCY`` slots, ``CS_QUEUE`` queue places,
``CS_FIRST_TOKEN`` and ``CS_PER_TOKEN`` seconds; ``CS_TENANTS`` tenants, by request id, when set).
A request whose user input is ``fault:gate@0`` waits for ``POST /_fuzz/gate`` before its first
token (see ``tests/support/faulty_engine.py``).

What the server saw, per request id (the client's ``X-Request-Id``), comes from two sides: every
callback call (state and reply text) and the package's own log lines (``accepted``,
``completed: <state>``, ``rejected: <reason>``). ``GET /_fuzz/records`` returns both,
``GET /_fuzz/stats`` the process's RSS, asyncio task count, open and live ``Reply`` objects and
sessions; ``POST /_fuzz/reset`` forgets the records.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import logging
import os
import sys
import zlib
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from chatstream_asgi import ChatStream, ChatStreamMiddleware, CompletionState, MockEngine, MockParams, get_result
from chatstream_asgi.logs import current_request_id
from chatstream_asgi.service.reply import Reply

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from faulty_engine import FaultyEngine

callbacks: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
logs: dict[str, list[str]] = collections.defaultdict(list)


def record(request: Request, state: CompletionState) -> None:
    result = get_result(request)
    callbacks[current_request_id() or "-"].append((state.value, result.reply if result is not None else ""))


class LogRecorder(logging.Handler):
    """Keeps the lifecycle lines of each request: ``accepted``, ``completed: ...``, ``rejected: ...``."""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        rid, _, text = message.partition("] ")
        if text.startswith(("accepted", "completed:", "rejected:")):
            logs[rid.lstrip("[")].append(text.split(" (")[0])


package_log = logging.getLogger("chatstream_asgi")
package_log.setLevel(logging.INFO)
package_log.addHandler(LogRecorder())
package_log.propagate = False

engine = FaultyEngine(
    MockEngine(
        MockParams(
            type="long",
            initial_wait_sec=float(os.environ.get("CS_FIRST_TOKEN", "0.005")),
            time_per_token_sec=float(os.environ.get("CS_PER_TOKEN", "0.001")),
        )
    )
)
TENANTS = int(os.environ.get("CS_TENANTS", "0"))
"""With N > 0, requests belong to N tenants, by their client's request id (fair admission on)."""


def tenant_of(scope: dict) -> str:
    rid = dict(scope.get("headers", ())).get(b"x-request-id", b"")
    return f"tenant-{zlib.crc32(rid) % TENANTS}"


chat_stream = ChatStream(
    engine,
    tenant=tenant_of if TENANTS else None,
    num_of_concurrent_executions=int(os.environ.get("CS_CONCURRENCY", "4")),
    max_queue_size=int(os.environ.get("CS_QUEUE", "8")),
    max_new_tokens=2000,
    callback=record,
    send_timeout=5.0,
    shutdown_timeout=0.5,
)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def records(request: Request) -> Response:
    return JSONResponse({"callbacks": callbacks, "logs": logs})


async def stats(request: Request) -> Response:
    gc.collect()
    return JSONResponse(
        {
            "rss": rss_bytes(),
            "tasks": len(asyncio.all_tasks()),
            "open_replies": len(chat_stream.replies._open),
            "live_replies": sum(isinstance(o, Reply) for o in gc.get_objects()),
            "sessions": len(chat_stream.sessions.store),
            **chat_stream.get_load(),
        }
    )


async def reset(request: Request) -> Response:
    callbacks.clear()
    logs.clear()
    return JSONResponse({})


async def gate(request: Request) -> Response:
    engine.gate.set()
    return JSONResponse({})


app = ChatStreamMiddleware(
    Starlette(
        routes=[
            Route("/_fuzz/records", records),
            Route("/_fuzz/stats", stats),
            Route("/_fuzz/reset", reset, methods=["POST"]),
            Route("/_fuzz/gate", gate, methods=["POST"]),
        ]
    ),
    chat_stream,
)
