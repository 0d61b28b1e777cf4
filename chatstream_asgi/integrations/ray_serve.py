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
  included): a replica that is stopped (scale-down, rolling redeploy, ``serve.delete``) lets every
  open reply finish, and a reply that would run longer ends with a ``deadline_exceeded`` error
  frame and ``unknown_error_occurred`` before Ray kills the replica. Ray 2.60 tells the app nothing
  when it starts stopping a replica: it waits for the replica's open requests (up to the budget,
  then kills the process) and only then runs the ASGI lifespan shutdown, so ChatStream's own
  ``shutdown_timeout`` never gets to end a stream there; the per-request deadline is what ends it;
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
import pickle
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from chatstream_asgi.engines.base import Engine
from chatstream_asgi.server.chatstream import ChatStream
from chatstream_asgi.service.config import ChatStreamConfig
from chatstream_asgi.sessions.manager import SESSION_HEADER, request_token, session_id_of

__all__ = ["REPLICA_HEADER", "FreeSlotRouter", "chat_app", "deployment_options"]

logger = logging.getLogger("chatstream_asgi.ray_serve")

REPLICA_HEADER = b"x-chatstream-replica"
"""Response header naming the Ray replica that served the request (for tracing sticky routing)."""

CONTROL_ROOM = 8
"""Requests a replica takes beyond the app's slots and queue: control endpoints and overflow to 429."""

SHUTDOWN_MARGIN_S = 5.0
"""Added to the graceful shutdown budget for the error frames and the lifespan shutdown."""

ROUTING_STATS_PERIOD_S = 1.0

AFFINITY_SESSIONS = 100_000
"""Conversations a router remembers the last replica of (least recently routed forgotten first)."""

REPORTED_SESSIONS = 1024
REPORT_WINDOW_S = 120.0
"""A replica reports the sessions it served in the last ``REPORT_WINDOW_S`` (at most ``REPORTED_SESSIONS``,
newest first) with its load: a conversation's first turn carries no session, so only the replica
knows where it went."""

_CHAT_STREAM_DEFAULTS = ChatStreamConfig.option_defaults()
_COMPLETIONS_TTL_S = 10.0
_REPLY_HEADER = b"x-chatstream-last-generated-message-id"
_IN_FLIGHT_LIMIT = 100_000


class _Routed(NamedTuple):
    """A request this router picked a replica for, until Ray reports it completed."""

    at: float  # time.time() of the pick
    replica: ReplicaID
    post: bool  # a POST takes a generation slot; a GET (/get_load, /metrics ...) does not


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
    ``serve.run(chat_app(...), route_prefix="/")``.
    """
    if not session_secret:
        raise ValueError("Ray Serve replicas need a fixed session_secret (a random one per replica rejects cookies)")
    if num_replicas > 1 and not session_store_url:
        raise ValueError("more than one replica needs a shared session store: pass session_store_url='redis://...'")
    limits = {**_CHAT_STREAM_DEFAULTS, **chat_stream_options}
    request_timeout = limits["request_timeout"]
    if request_timeout is not None and request_timeout > longest_reply_s:
        raise ValueError("request_timeout must not exceed longest_reply_s (Ray would kill longer replies unreported)")
    chat_stream_options["request_timeout"] = request_timeout or longest_reply_s
    options = deployment_options(
        num_of_concurrent_executions=limits["num_of_concurrent_executions"],
        max_queue_size=limits["max_queue_size"],
        longest_reply_s=longest_reply_s,
        shutdown_timeout=limits["shutdown_timeout"],
        control_room=control_room,
        session_cookie=limits["session_cookie"],
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
            app: _ReplicaApp = self.app  # type: ignore[attr-defined]
            return {**app.chat_stream.get_load(), "at": time.time(), "sessions": app.recent_sessions()}

    deployment = serve.deployment(
        ChatStreamReplica,
        name=name,
        num_replicas=num_replicas,
        ray_actor_options=dict(ray_actor_options or {"num_cpus": 0}),
        **options,
    )
    return deployment.bind()


class _ReplicaApp:
    """The replica's ASGI app: names the replica in an ``X-ChatStream-Replica`` response header, and
    remembers the sessions whose turns it answered (chat replies: they carry the session's
    ``X-Session-Id`` and ``X-ChatStream-Last-Generated-Message-Id``; a 429 does not) for the router."""

    def __init__(self, app: Any, chat_stream: ChatStream) -> None:
        self.app = app
        self.chat_stream = chat_stream
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


class FreeSlotRouter(RequestRouter):
    """Route each request to the replica with the most free generation slots, keeping a conversation
    on the replica that served its last turn while that replica has a free slot.

    A replica's load is the larger of what this router knows (the POSTs it routed there that Ray has
    not reported completed; counted from the pick, so that simultaneous requests do not all pick the
    same replica) and what the replica itself reported through ``record_routing_stats`` (its
    ChatStream's ``processing + waiting``, which includes requests from other proxies; at most
    ``ROUTING_STATS_PERIOD_S`` old, less this router's requests that were open when it was taken
    and have ended since). Ray's own queue-length cache is not used: it takes the count a replica
    reports when it accepts a request, which may still include a request whose completion Ray has
    already subtracted, and then counts that request for up to 10 s. Slots are the replica's
    reported ``max_processing``. Replicas are ranked one per rank: free slots first, by load relative
    to slots; then the full ones, the one whose oldest open request was picked first leading; ties
    rotate.

    Ray tells the router a request completed only after the replica's ASGI call returned (the turn
    saved, the callback called) and the proxy saw its result end: later than the client saw its last
    byte. A client that sends its next requests at that instant finds a replica still counted full
    by a request that has in fact ended; among full replicas, that one (whose oldest open request is
    oldest) therefore goes first, and the burst lands where a slot is free.

    Session affinity: a request's session is the token in Ray's session header (``x-session-id``
    unless ``RAY_SERVE_SESSION_ID_HEADER_KEY`` says otherwise; the app's own ``X-Session-Id``
    request header, so API clients need nothing more), else the session cookie (read from the
    ASGI scope the proxy hands on for the replica). Its last replica is the newer of this router's
    own last pick for a POST of it and the replicas' reports of the sessions whose turns they
    answered (a conversation's first turn has no session yet: only the replica knows where it went,
    and the router learns it from the next report, up to ``ROUTING_STATS_PERIOD_S`` later). That
    replica comes first when it has a free slot; when it is full or gone, the usual ranking applies.

    Each pick goes to the request it was made for (Ray's exact matching: its ``FIFOMixin`` would hand
    it to whichever request waits longest, another conversation's). A pick that Ray never sends and
    never completes (the client left while it was being routed) is forgotten after
    ``longest_request_s``, the longest a request may run.
    """

    def initialize_state(
        self, session_cookie: str = "chatstream_session", longest_request_s: float = 3600.0, **kwargs: Any
    ) -> None:
        self._cookie = session_cookie
        self._longest_request_s = longest_request_s
        self._turn = 0
        self._last: collections.OrderedDict[str, tuple[float, ReplicaID]] = collections.OrderedDict()
        self._ingested: dict[ReplicaID, float] = {}
        self._in_flight: dict[str, _Routed] = {}  # request id -> its pick, oldest first
        self._posts: collections.Counter[ReplicaID] = collections.Counter()  # POSTs in flight per replica
        self._ended: dict[ReplicaID, collections.deque[tuple[float, float]]] = collections.defaultdict(
            collections.deque
        )

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        wall = time.time()
        self._expire(wall)
        n = len(candidate_replicas)
        self._turn = (self._turn + 1) % n
        self._take_in_reports(candidate_replicas)
        session, post = self._session(pending_request)
        home = self._home(session, candidate_replicas) if session else None
        slots = {replica.replica_id: _slots(replica) for replica in candidate_replicas}
        loads = {replica.replica_id: self._load(replica) for replica in candidate_replicas}
        full = {replica_id for replica_id, load in loads.items() if load >= slots[replica_id]}
        oldest = self._oldest_open(full) if full else {}

        def rank(item: tuple[int, RunningReplica]) -> tuple[bool, float, int]:
            index, replica = item
            replica_id = replica.replica_id
            if replica_id in full:  # the likeliest to have a slot free already: its oldest open request's
                return (True, oldest.get(replica_id, wall), (index - self._turn) % n)
            return (False, loads[replica_id] / slots[replica_id], (index - self._turn) % n)

        ranked = [replica for _, replica in sorted(enumerate(candidate_replicas), key=rank)]
        if home is not None and loads[home.replica_id] < slots[home.replica_id]:
            ranked.remove(home)
            ranked.insert(0, home)
        if session and post:
            self._remember(session, wall, ranked[0].replica_id)
        if pending_request is not None:
            request_id = pending_request.metadata.internal_request_id
            self._forget(request_id)  # routed again: the earlier pick is void
            self._in_flight[request_id] = _Routed(wall, ranked[0].replica_id, post)
            self._posts[ranked[0].replica_id] += post
            if len(self._in_flight) > _IN_FLIGHT_LIMIT:
                self._forget(next(iter(self._in_flight)))
        return [[replica] for replica in ranked]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        """Ray sent the request to ``replica_id`` and the replica accepted it. That may be a lower rank than
        the pick: Ray skips a rank whose queue length probe timed out or says full. Count it there."""
        request_id = pending_request.metadata.internal_request_id
        routed = self._in_flight.get(request_id)
        if routed is not None and routed.replica != replica_id:
            self._in_flight[request_id] = routed._replace(replica=replica_id)  # keeps its place: oldest first
            self._posts[replica_id] += routed.post
            self._posts[routed.replica] -= routed.post

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        routed = self._forget(internal_request_id)
        if routed is not None and routed.post:
            ended = self._ended[replica_id]
            ended.append((routed.at, time.time()))
            while ended and ended[-1][1] - ended[0][1] > _COMPLETIONS_TTL_S:
                ended.popleft()

    def _forget(self, request_id: str) -> _Routed | None:
        routed = self._in_flight.pop(request_id, None)
        if routed is not None:
            self._posts[routed.replica] -= routed.post
        return routed

    def _oldest_open(self, replicas: set[ReplicaID]) -> dict[ReplicaID, float]:
        """When this router picked each of ``replicas``' oldest open POST (``_in_flight`` is oldest first)."""
        oldest: dict[ReplicaID, float] = {}
        for routed in self._in_flight.values():
            if routed.post and routed.replica in replicas and routed.replica not in oldest:
                oldest[routed.replica] = routed.at
                if len(oldest) == len(replicas):
                    break
        return oldest

    def _expire(self, wall: float) -> None:
        """Forget picks older than the longest request (never sent, so never completed)."""
        while self._in_flight:
            request_id, routed = next(iter(self._in_flight.items()))
            if wall - routed.at <= self._longest_request_s:
                return
            self._forget(request_id)

    def _load(self, replica: RunningReplica) -> int:
        """The larger of this router's POSTs in flight there and the replica's report (less this router's
        requests that ended since it was taken)."""
        replica_id = replica.replica_id
        known = self._posts[replica_id]
        stats = replica.routing_stats or {}
        reported = int(stats.get("processing", 0)) + int(stats.get("waiting", 0))
        at = stats.get("at")
        if reported and at is not None:
            reported -= sum(1 for routed, ended in self._ended.get(replica_id, ()) if routed < at < ended)
        return max(known, reported)

    def _session(self, pending_request: PendingRequest | None) -> tuple[str | None, bool]:
        """The session id the request presents (Ray's session header, else the session cookie), and
        whether it may be a turn (a POST: a GET such as ``/get_load`` follows a session, never moves it)."""
        if pending_request is None:
            return None, False
        metadata = pending_request.metadata
        token, method = metadata.session_id or None, "POST"
        if metadata.is_http_request and pending_request.args:
            argument = pending_request.args[0]  # the proxy's own pickled StreamingHTTPRequest
            try:
                scope = pickle.loads(argument).asgi_scope if isinstance(argument, bytes) else {}
                method = scope.get("method", method)
                token = token or request_token(scope.get("headers", ()), self._cookie)[0]
            except Exception:  # another Ray version's request format: Ray's session header only
                pass
        return (session_id_of(token) if token else None), method == "POST"

    def _take_in_reports(self, candidates: list[RunningReplica]) -> None:
        """Each replica's new report of the sessions it answered, once (it is renewed every period)."""
        for replica in candidates:
            stats = replica.routing_stats or {}
            if "sessions" in stats and self._ingested.get(replica.replica_id) != stats.get("at"):
                self._ingested[replica.replica_id] = stats["at"]
                for session, at in stats["sessions"].items():
                    self._remember(session, at, replica.replica_id)

    def _home(self, session: str, candidates: list[RunningReplica]) -> RunningReplica | None:
        """The candidate that served the session last (this router's picks and the replicas' reports)."""
        last = self._last.get(session)
        if last is None:
            return None
        return next((replica for replica in candidates if replica.replica_id == last[1]), None)

    def _remember(self, session: str, at: float, replica_id: ReplicaID) -> None:
        known = self._last.get(session)
        if known is not None and known[0] > at:
            return
        self._last[session] = (at, replica_id)
        self._last.move_to_end(session)
        if len(self._last) > AFFINITY_SESSIONS:
            self._last.popitem(last=False)


def _slots(replica: RunningReplica) -> int:
    """The generation slots a replica reported (Ray's own limit until its first report)."""
    return max(1, int((replica.routing_stats or {}).get("max_processing") or replica.max_ongoing_requests))
