"""``FreeSlotRouter``: Ray Serve's request router for chat replicas (see :mod:`.ray_serve`, which installs it).

Ray's default router probes queue lengths concurrently, so simultaneous requests tie and land on one
replica while another idles; and it knows nothing of a replica's generation slots. This router ranks
replicas by the free slots each has, from the chat requests it routed there and each replica's own
``get_load()`` report, and keeps a conversation on the replica that served its last turn.
"""

from __future__ import annotations

import collections
import pickle
import time
from typing import Any, NamedTuple

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from chatstream_asgi.sessions.manager import request_token, session_id_of

__all__ = ["AFFINITY_SESSIONS", "ROUTING_STATS_PERIOD_S", "FreeSlotRouter"]

ROUTING_STATS_PERIOD_S = 1.0
"""How often each replica reports its load (and the sessions it served) to the routers."""

AFFINITY_SESSIONS = 100_000
"""Conversations a router remembers the last replica of (least recently routed forgotten first)."""

_COMPLETIONS_TTL_S = 10.0
_IN_FLIGHT_LIMIT = 100_000


class _Routed(NamedTuple):
    """A request this router picked a replica for, until Ray reports it completed."""

    at: float  # time.time() of the pick
    replica: ReplicaID
    post: bool  # a POST takes a generation slot; a GET (/get_load, /metrics ...) does not


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
