"""Run chatstream-asgi as a Ray Serve deployment: one ``ChatStream`` per replica, behind Ray's HTTP proxy.

:func:`chat_app` returns a Ray Serve application that sets what the app needs from Ray:

- builder ingress (``@serve.ingress(builder)``): each replica builds its own engine, ``ChatStream`` and
  :class:`~chatstream_asgi.ChatStreamMiddleware` on its own event loop; the middleware's lifespan runs
  in each replica;
- ``max_ongoing_requests`` = the app's slots + queue + ``control_room``: Ray's own per-replica limit
  (default 5) would hold requests in Ray's router, where the app's queue, queue events, 429 and
  completion states never see them; with room above the app's limits every request reaches the app,
  overflow gets the app's 429 with ``Retry-After``, and ``/get_load`` or ``/metrics`` never wait
  behind streams;
- ``graceful_shutdown_timeout_s`` = ``longest_reply_s`` + ``shutdown_timeout`` + margin: a replica
  that is stopped (scale-down, rolling redeploy) lets every open reply finish instead of being
  killed with no state and no error frame;
- one ``session_secret`` and one Redis session store for all replicas (required with more than
  one replica: a per-replica secret or store would lose the conversation on the next replica);
- :class:`FreeSlotRouter`, a Ray request router that sends each request to the replica with the
  most free generation slots, from Ray's count of requests it routed there and each replica's own
  ``get_load()`` (reported through ``record_routing_stats``). Ray's default router probes queue
  lengths concurrently, so simultaneous requests tie and land on one replica while another idles.

Needs ``ray[serve]`` (the ``ray`` extra). Engine factories and ``app_factory`` are pickled by Ray:
pass importable functions (or ``functools.partial`` of them), not lambdas from a ``__main__`` that
the replicas cannot import.
"""

from __future__ import annotations

import collections
import inspect
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

from chatstream_asgi.engines.base import Engine
from chatstream_asgi.service.chatstream import ChatStream

__all__ = ["REPLICA_HEADER", "FreeSlotRouter", "chat_app", "deployment_options"]

logger = logging.getLogger("chatstream_asgi.ray_serve")

REPLICA_HEADER = b"x-chatstream-replica"
"""Response header naming the Ray replica that served the request (for tracing sticky routing)."""

CONTROL_ROOM = 8
"""Requests a replica takes beyond the app's slots and queue: control endpoints and overflow to 429."""

SHUTDOWN_MARGIN_S = 5.0
"""Added to the graceful shutdown budget for the error frames and the lifespan shutdown."""

ROUTING_STATS_PERIOD_S = 1.0
_CHAT_STREAM_DEFAULTS = {
    name: parameter.default
    for name, parameter in inspect.signature(ChatStream.__init__).parameters.items()
    if parameter.default is not inspect.Parameter.empty
}
_RESERVATION_TTL_S = 2.0


def deployment_options(
    *,
    num_of_concurrent_executions: int,
    max_queue_size: int,
    longest_reply_s: float,
    shutdown_timeout: float = 10.0,
    control_room: int = CONTROL_ROOM,
) -> dict[str, Any]:
    """The ``serve.deployment`` options a ChatStream replica needs (see the module docstring)."""
    if longest_reply_s <= 0:
        raise ValueError("longest_reply_s must be positive: the longest a reply may stream, in seconds")
    return {
        "max_ongoing_requests": num_of_concurrent_executions + max_queue_size + control_room,
        "graceful_shutdown_timeout_s": longest_reply_s + shutdown_timeout + SHUTDOWN_MARGIN_S,
        "graceful_shutdown_wait_loop_s": 0.5,
        "request_router_config": RequestRouterConfig(
            request_router_class=FreeSlotRouter, request_routing_stats_period_s=ROUTING_STATS_PERIOD_S
        ),
    }


def chat_app(
    engine_factory: Callable[[], Engine],
    *,
    session_secret: str,
    session_store_url: str | None = None,
    num_replicas: int = 1,
    longest_reply_s: float,
    control_room: int = CONTROL_ROOM,
    app_factory: Callable[[ChatStream], Any] | None = None,
    name: str = "chatstream",
    ray_actor_options: Mapping[str, Any] | None = None,
    **chat_stream_options: Any,
) -> serve.Application:
    """A Ray Serve application serving ``ChatStream(engine_factory(), **chat_stream_options)`` per replica.

    ``longest_reply_s`` is the longest a reply may stream (``max_new_tokens`` over the slowest
    tokens per second you accept); with ``shutdown_timeout`` (a ``ChatStream`` option) it sets
    Ray's graceful shutdown budget. ``session_store_url`` (``redis://host:port/db``) is required
    with more than one replica. ``app_factory(chat_stream)`` builds the replica's ASGI app around
    the service (default :func:`~chatstream_asgi.create_app`: chat page, chat endpoints, extra
    APIs, ``/metrics``). ``ray_actor_options`` default to ``{"num_cpus": 0}`` (the engine's thread
    is not a Ray task); give a GPU engine ``{"num_gpus": 1}``. Run it with
    ``serve.run(chat_app(...), route_prefix="/")``.
    """
    if not session_secret:
        raise ValueError("Ray Serve replicas need a fixed session_secret (a random one per replica rejects cookies)")
    if num_replicas > 1 and not session_store_url:
        raise ValueError("more than one replica needs a shared session store: pass session_store_url='redis://...'")
    limits = {**_CHAT_STREAM_DEFAULTS, **chat_stream_options}
    options = deployment_options(
        num_of_concurrent_executions=limits["num_of_concurrent_executions"],
        max_queue_size=limits["max_queue_size"],
        longest_reply_s=longest_reply_s,
        shutdown_timeout=limits["shutdown_timeout"],
        control_room=control_room,
    )

    def build() -> _ReplicaApp:
        """Runs in the replica, on its event loop's thread: its own engine, service and app."""
        from chatstream_asgi.web.app import create_app

        store = None
        if session_store_url:
            from chatstream_asgi.sessions.redis_store import RedisSessionStore

            store = RedisSessionStore.from_url(session_store_url)
        chat_stream = ChatStream(
            engine_factory(),
            session_secret=session_secret,
            session_store=store,
            echo_request_id=False,  # Ray's proxy sets X-Request-Id on every response itself
            **chat_stream_options,
        )
        return _ReplicaApp((app_factory or create_app)(chat_stream), chat_stream)

    @serve.ingress(build)
    class ChatStreamReplica:
        """One replica: the app ``build`` made, its load reported to :class:`FreeSlotRouter`."""

        def record_routing_stats(self) -> dict[str, Any]:
            return self.app.chat_stream.get_load()  # type: ignore[attr-defined]

    deployment = serve.deployment(
        ChatStreamReplica,
        name=name,
        num_replicas=num_replicas,
        ray_actor_options=dict(ray_actor_options or {"num_cpus": 0}),
        **options,
    )
    return deployment.bind()


class _ReplicaApp:
    """The replica's ASGI app: names the replica in an ``X-ChatStream-Replica`` response header."""

    def __init__(self, app: Any, chat_stream: ChatStream) -> None:
        self.app = app
        self.chat_stream = chat_stream
        self.tag = serve.get_replica_context().replica_tag.encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def tagged_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), (REPLICA_HEADER, self.tag)]}
            await send(message)

        await self.app(scope, receive, tagged_send)


class FreeSlotRouter(FIFOMixin, RequestRouter):
    """Route each request to the replica with the most free generation slots.

    A replica's load is the larger of what this router knows (Ray's count of requests it has sent
    there, plus picks made a moment ago whose send has not been counted yet, so that simultaneous
    requests do not all pick the same replica) and what the replica itself reported through
    ``record_routing_stats`` (its ChatStream's ``processing + waiting``, which includes requests
    from other proxies; at most ``ROUTING_STATS_PERIOD_S`` old). Slots are the replica's reported
    ``max_processing``. Replicas are ranked one per rank: free slots first, then by load relative
    to slots; ties rotate.
    """

    def initialize_state(self, **kwargs: Any) -> None:
        self._picked: dict[ReplicaID, collections.deque[float]] = collections.defaultdict(collections.deque)
        self._turn = 0

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        now = time.monotonic()
        n = len(candidate_replicas)
        self._turn = (self._turn + 1) % n

        def rank(item: tuple[int, RunningReplica]) -> tuple[bool, float, int]:
            index, replica = item
            stats = replica.routing_stats or {}
            slots = max(1, int(stats.get("max_processing") or replica.max_ongoing_requests))
            load = max(self._known_load(replica, now), int(stats.get("processing", 0)) + int(stats.get("waiting", 0)))
            return (load >= slots, load / slots, (index - self._turn) % n)

        ranked = [replica for _, replica in sorted(enumerate(candidate_replicas), key=rank)]
        self._picked[ranked[0].replica_id].append(now)
        return [[replica] for replica in ranked]

    def on_send_request(self, replica_id: ReplicaID) -> None:
        super().on_send_request(replica_id)  # Ray's count now includes it: drop our pick
        picked = self._picked.get(replica_id)
        if picked:
            picked.popleft()

    def _known_load(self, replica: RunningReplica, now: float) -> int:
        picked = self._picked.get(replica.replica_id)
        while picked and now - picked[0] > _RESERVATION_TTL_S:
            picked.popleft()
        return (self.replica_queue_len_cache.get(replica.replica_id) or 0) + len(picked or ())
