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
- ``graceful_shutdown_timeout_s`` = ``longest_reply_s`` + ``shutdown_timeout`` + margin, and every
  request ends within ``longest_reply_s`` (``ChatStream``'s ``request_timeout``, queue wait
  included): a replica that is stopped (scale-down, rolling redeploy, ``serve.delete``,
  :func:`drain`) lets every open reply finish, and a reply that would run longer ends with a
  ``deadline_exceeded`` error frame and ``unknown_error_occurred`` before Ray kills the replica.
  Ray 2.60 tells the app nothing when it starts stopping a replica: it waits for the replica's open
  requests (up to the budget, then kills the process) and only then runs the ASGI lifespan
  shutdown, so ChatStream's own ``shutdown_timeout`` never gets to end a stream there; the
  per-request deadline is what ends it. ``serve.shutdown()`` alone is not such a stop: it kills
  Ray's HTTP proxies at once (``ProxyState.shutdown`` calls ``ray.kill``), in the same control-loop
  tick in which it starts stopping the replicas, so every open stream's connection is gone before
  a frame can be sent, and the replicas see their requests cancelled as when clients leave
  (recorded as client disconnects). Stop with :func:`shutdown` (or :func:`drain` first), which
  deletes the apps, so that their replicas drain while the proxies still carry the streams;
- one ``session_secret`` and one Redis session store for all replicas (required with more than
  one replica: a per-replica secret or store would lose the conversation on the next replica);
- :class:`FreeSlotRouter`, a Ray request router that sends each request to the replica with the
  most free generation slots, from the chat requests it routed there that have not ended and each
  replica's own ``get_load()`` (reported through ``record_routing_stats``). Ray's default router
  probes queue lengths concurrently, so simultaneous requests tie and land on one replica while
  another idles.
  It keeps each conversation on the replica that served its last turn while that replica has a
  free slot (session affinity: that replica's engine holds the conversation's KV and prefix cache);
  otherwise the turn goes to the most-free replica, continues from the shared store and simply
  prefills in full.

Needs ``ray[serve]`` (the ``ray`` extra). Engine factories and ``app_factory`` are pickled by Ray:
pass importable functions (or ``functools.partial`` of them), not lambdas from a ``__main__`` that
the replicas cannot import.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig

from chatstream_asgi.engines.base import Engine
from chatstream_asgi.integrations.ray_router import ROUTING_STATS_PERIOD_S, FreeSlotRouter
from chatstream_asgi.server.chatstream import ChatStream
from chatstream_asgi.service.config import ChatStreamConfig
from chatstream_asgi.sessions.manager import SESSION_HEADER, session_id_of

__all__ = ["REPLICA_HEADER", "FreeSlotRouter", "RayMetrics", "chat_app", "deployment_options", "drain", "shutdown"]

logger = logging.getLogger("chatstream_asgi.ray_serve")

REPLICA_HEADER = b"x-chatstream-replica"
"""Response header naming the Ray replica that served the request (for tracing sticky routing)."""

CONTROL_ROOM = 8
"""Requests a replica takes beyond the app's slots and queue: control endpoints and overflow to 429."""

SHUTDOWN_MARGIN_S = 5.0
"""Added to the graceful shutdown budget for the error frames and the lifespan shutdown."""

REPORTED_SESSIONS = 1024
REPORT_WINDOW_S = 120.0
"""A replica reports the sessions it served in the last ``REPORT_WINDOW_S`` (at most ``REPORTED_SESSIONS``,
newest first) with its load: a conversation's first turn carries no session, so only the replica
knows where it went."""

_CHAT_STREAM_DEFAULTS = ChatStreamConfig.option_defaults()
_REPLY_HEADER = b"x-chatstream-last-generated-message-id"


def deployment_options(
    *,
    num_of_concurrent_executions: int,
    max_queue_size: int,
    longest_reply_s: float,
    shutdown_timeout: float = 10.0,
    control_room: int = CONTROL_ROOM,
    session_cookie: str = "chatstream_session",
) -> dict[str, Any]:
    """The ``serve.deployment`` options a ChatStream replica needs (see the module docstring).

    The graceful shutdown budget holds only if no request runs longer than ``longest_reply_s``:
    give the replica's ``ChatStream`` ``request_timeout=longest_reply_s`` (:func:`chat_app` does).
    """
    if longest_reply_s <= 0:
        raise ValueError("longest_reply_s must be positive: the longest a reply may stream, in seconds")
    budget = longest_reply_s + shutdown_timeout + SHUTDOWN_MARGIN_S
    return {
        "max_ongoing_requests": num_of_concurrent_executions + max_queue_size + control_room,
        "graceful_shutdown_timeout_s": budget,
        "graceful_shutdown_wait_loop_s": 0.5,
        "request_router_config": RequestRouterConfig(
            request_router_class=FreeSlotRouter,
            request_router_kwargs={"session_cookie": session_cookie, "longest_request_s": budget},
            request_routing_stats_period_s=ROUTING_STATS_PERIOD_S,
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
    log_level: str | int = "INFO",
    **chat_stream_options: Any,
) -> serve.Application:
    """A Ray Serve application serving ``ChatStream(engine_factory(), **chat_stream_options)`` per replica.

    ``longest_reply_s`` is the longest a request may take, queue wait included (``max_new_tokens``
    over the slowest tokens per second you accept, plus the queue wait you accept): it becomes the
    replica's ``request_timeout`` (a request still running then ends with a ``deadline_exceeded``
    error frame and ``unknown_error_occurred``; a smaller ``request_timeout`` may be given), and with
    ``shutdown_timeout`` (a ``ChatStream`` option) it sets Ray's graceful shutdown budget, so that no
    reply is still open when Ray kills a stopping replica.

    ``session_store_url`` (``redis://host:port/db``) is required with more than one replica.
    ``app_factory(chat_stream)`` builds the replica's ASGI app around the service (default
    :func:`~chatstream_asgi.create_app`: chat page, chat endpoints, extra APIs, ``/metrics``).
    ``ray_actor_options`` default to ``{"num_cpus": 0}`` (the engine's thread is not a Ray task);
    give a GPU engine ``{"num_gpus": 1}``. Run it with
    ``serve.run(chat_app(...), route_prefix="/")``, stop it with :func:`shutdown`.

    Per replica: the package's log lines (``log_level`` and above) go where Ray Serve writes the
    replica's own (its log file under ``/tmp/ray/session_latest/logs/serve/``, and the driver's
    console), and its metrics are mirrored into Ray's, tagged with ``deployment``, ``replica`` and
    ``application``, each time the replica reports its load (every ``ROUTING_STATS_PERIOD_S``):
    scrape Ray's metrics endpoint of each node for ``ray_chatstream_*``. ``/metrics`` through the
    proxy answers whichever replica Ray picked (its ``X-ChatStream-Replica`` header says which).
    """
    if not session_secret:
        raise ValueError("Ray Serve replicas need a fixed session_secret (a random one per replica rejects cookies)")
    if num_replicas > 1 and not session_store_url:
        raise ValueError("more than one replica needs a shared session store: pass session_store_url='redis://...'")
    flat = {name: value for name, value in chat_stream_options.items() if name in _CHAT_STREAM_DEFAULTS}
    config = (chat_stream_options.get("config") or ChatStreamConfig()).with_options(**flat)
    request_timeout = config.timeouts.request_timeout
    if request_timeout is not None and request_timeout > longest_reply_s:
        raise ValueError("request_timeout must not exceed longest_reply_s (Ray would kill longer replies unreported)")
    chat_stream_options["request_timeout"] = request_timeout or longest_reply_s
    options = deployment_options(
        num_of_concurrent_executions=config.limits.num_of_concurrent_executions,
        max_queue_size=config.limits.max_queue_size,
        longest_reply_s=longest_reply_s,
        shutdown_timeout=config.timeouts.shutdown_timeout,
        control_room=control_room,
        session_cookie=config.sessions.session_cookie,
    )

    def build() -> _ReplicaApp:
        """Runs in the replica, on its event loop's thread: its own engine, service and app."""
        from chatstream_asgi.web.app import create_app

        _log_into_ray_serve(log_level)

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
            app: _ReplicaApp = self.app  # type: ignore[attr-defined]
            app.metrics.mirror()
            return {**app.chat_stream.get_load(), "at": time.time(), "sessions": app.recent_sessions()}

    deployment = serve.deployment(
        ChatStreamReplica,
        name=name,
        num_replicas=num_replicas,
        ray_actor_options=dict(ray_actor_options or {"num_cpus": 0}),
        **options,
    )
    return deployment.bind()


def drain(*names: str) -> None:
    """Delete the Serve applications ``names`` (default: all of them) and wait until they are gone.

    Each replica stops taking requests and Ray waits for its open ones (up to its graceful budget),
    while Ray's HTTP proxies still carry them: every open reply ends as the state table says
    (``success``, or ``unknown_error_occurred`` with a ``deadline_exceeded`` frame at the request's
    deadline), a queued one is served first. Requests that arrive meanwhile get the proxy's 404.
    """
    apps = names or tuple(serve.status().applications)
    deleting = [threading.Thread(target=serve.delete, args=(name,), name=f"drain-{name}") for name in apps]
    for thread in deleting:
        thread.start()
    for thread in deleting:
        thread.join()


def shutdown() -> None:
    """Shut Serve down without cutting open streams: :func:`drain` every app, then ``serve.shutdown()``
    (which alone kills the HTTP proxies at once, with the streams on them)."""
    drain()
    serve.shutdown()


def _log_into_ray_serve(level: str | int) -> None:
    """The package's log lines at ``level`` and above through Ray Serve's own handlers of this replica."""
    package, ray_serve = logging.getLogger("chatstream_asgi"), logging.getLogger("ray.serve")
    package.setLevel(level)
    for handler in ray_serve.handlers:
        if handler not in package.handlers:
            package.addHandler(handler)
    package.propagate = not ray_serve.handlers


class RayMetrics:
    """A replica's metrics (a Prometheus registry) mirrored into Ray Serve's metrics, one gauge per sample name,
    tagged by Ray with the deployment, replica and application: Ray's metrics endpoint then has every replica's."""

    def __init__(self, registry: Any) -> None:
        self.registry = registry
        self.gauges: dict[tuple[str, tuple[str, ...]], Any] = {}

    def mirror(self) -> None:
        from ray.serve.metrics import Gauge

        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                keys = tuple(sorted(sample.labels))
                gauge = self.gauges.get((sample.name, keys))
                if gauge is None:
                    gauge = Gauge(sample.name, description=family.documentation, tag_keys=keys)
                    self.gauges[sample.name, keys] = gauge
                gauge.set(sample.value, tags=dict(sample.labels) or None)


class _ReplicaApp:
    """The replica's ASGI app: names the replica in an ``X-ChatStream-Replica`` response header, and
    remembers the sessions whose turns it answered (chat replies: they carry the session's
    ``X-Session-Id`` and ``X-ChatStream-Last-Generated-Message-Id``; a 429 does not) for the router."""

    def __init__(self, app: Any, chat_stream: ChatStream) -> None:
        self.app = app
        self.chat_stream = chat_stream
        self.metrics = RayMetrics(chat_stream.metrics.registry)
        self.tag = serve.get_replica_context().replica_tag.encode()
        self.served: collections.OrderedDict[str, float] = collections.OrderedDict()

    def recent_sessions(self) -> dict[str, float]:
        """Session id -> when (``time.time()``) this replica last answered it, for the router."""
        since = time.time() - REPORT_WINDOW_S
        recent: dict[str, float] = {}
        for session_id in reversed(self.served):
            at = self.served[session_id]
            if at < since or len(recent) >= REPORTED_SESSIONS:
                break
            recent[session_id] = at
        return recent

    def _served(self, headers: Any) -> None:
        """Remember the session of a chat reply (only those carry a generated message's id)."""
        found = dict(headers)
        token = found.get(SESSION_HEADER)
        if token is None or _REPLY_HEADER not in found:
            return
        session_id = session_id_of(token.decode("latin-1"))
        self.served[session_id] = time.time()
        self.served.move_to_end(session_id)
        if len(self.served) > REPORTED_SESSIONS:
            self.served.popitem(last=False)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def tagged_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                self._served(message.get("headers", ()))
                message = {**message, "headers": [*message.get("headers", ()), (REPLICA_HEADER, self.tag)]}
            await send(message)

        await self.app(scope, receive, tagged_send)
