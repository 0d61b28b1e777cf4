"""``FreeSlotRouter`` on its own, driven the way Ray's proxy drives it (choose, then completed), with no Ray
processes: the orderings that a loaded machine produces only now and then in ``test_ray_serve.py``."""

from __future__ import annotations

import collections
import pickle
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("ray.serve")

from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID

from chatstream_asgi.integrations.ray_serve import FreeSlotRouter

pytestmark = [pytest.mark.anyio, pytest.mark.ray]

DEPLOYMENT = DeploymentID(name="two", app_name="chat")


class Replica:
    """What the router reads of a Ray ``RunningReplica``: its id, its last report and Ray's own limit."""

    def __init__(self, name: str, slots: int = 1) -> None:
        self.replica_id = ReplicaID(unique_id=name, deployment_id=DEPLOYMENT)
        self.max_ongoing_requests = 9  # Ray's own limit: slots + queue + room for GETs
        self.slots = slots
        self.report(processing=0)

    def report(self, processing: int, sessions: dict[str, float] | None = None) -> None:
        """``record_routing_stats`` as the replica returns it (``slots`` slots, no queue)."""
        at = time.time()
        self.routing_stats = {"processing": processing, "waiting": 0, "max_processing": self.slots, "at": at}
        self.routing_stats["sessions"] = sessions or {}


class Proxy:
    """Ray's proxy around the router: numbers its requests, sends each to the first replica the router ranks,
    and tells the router when each completed."""

    def __init__(self, *replicas: Replica) -> None:
        self.router = FreeSlotRouter(DEPLOYMENT, DeploymentHandleSource.PROXY, use_replica_queue_len_cache=True)
        self.router.initialize_state(longest_request_s=60.0)
        self.replicas = list(replicas)
        self.count = 0

    async def route(
        self, method: str = "POST", session: str | None = None, send: bool = True, rank: int = 0
    ) -> tuple[str, Replica]:
        """Route one request (``session`` sent in the ``X-Session-Id`` header); its id and replica. ``rank``
        1: Ray skips the first rank (its queue length probe timed out) and sends to the second."""
        self.count += 1
        request_id = f"request-{self.count}"
        headers = [(b"x-session-id", session.encode())] if session else []
        scope = {"type": "http", "method": method, "headers": headers}
        metadata = SimpleNamespace(internal_request_id=request_id, session_id=None, is_http_request=True)
        pending = SimpleNamespace(metadata=metadata, args=[pickle.dumps(SimpleNamespace(asgi_scope=scope))])
        replica = (await self.router.choose_replicas(self.replicas, pending))[rank][0]
        if send:  # as Ray does once it sent the request, and once the replica accepted it
            self.router.on_send_request(replica.replica_id)
            self.router.on_request_routed(pending, replica.replica_id, None)
        return request_id, replica

    def completed(self, request_id: str, replica: Replica) -> None:
        self.router.decrement_queue_len_cache(replica.replica_id)  # Ray's two callbacks on a completion
        self.router.on_request_completed(replica.replica_id, request_id)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_simultaneous_requests_take_both_replicas_and_a_full_replica_frees_on_completion() -> None:
    a, b = Replica("a"), Replica("b")
    proxy = Proxy(a, b)
    first, on = await proxy.route()
    _, other = await proxy.route()  # before Ray has sent the first: the pick counts at once
    assert {on, other} == {a, b}
    proxy.completed(first, on)
    _, third = await proxy.route()
    assert third is on  # the only free slot
    _, get = await proxy.route("GET")
    _, fourth = await proxy.route()  # a GET takes no slot: both full, so the ranking goes on
    assert get in (a, b) and fourth in (a, b)


async def test_a_stale_report_is_corrected_by_the_completions_since() -> None:
    """A report taken while a request ran still counts it; the router's completion since then does not."""
    a, b = Replica("a"), Replica("b")
    proxy = Proxy(a, b)
    request, on = await proxy.route()
    on.report(processing=1)
    off = b if on is a else a
    off.report(processing=0)
    proxy.completed(request, on)
    _, first = await proxy.route()
    _, second = await proxy.route()
    assert {first, second} == {a, b}


async def test_another_conversation_on_the_home_sends_the_turn_away_until_it_ends() -> None:
    a, b = Replica("a"), Replica("b")
    proxy = Proxy(a, b)
    turn, home = await proxy.route(session="s1")
    proxy.completed(turn, home)
    for _ in range(2):  # another client's first request: both replicas are free, and ties rotate
        other, held = await proxy.route()
        if held is home:
            break
        proxy.completed(other, held)
    assert held is home
    moved, away = await proxy.route(session="s1")
    assert away is not home
    proxy.completed(moved, away)
    proxy.completed(other, held)
    _, again = await proxy.route(session="s1")
    assert again is away  # its last turn is there now


async def test_rays_stale_queue_length_does_not_send_a_turn_away_from_a_free_home() -> None:
    """Ray sets its cached queue length from the count a replica reports when it accepts a request. A
    ``/get_prompt`` accepted while the last turn still ran reports 2; if Ray had already subtracted that
    turn, the cache then says 1 for a replica with nothing in flight, for up to 10 s (the CI failure)."""
    a, b = Replica("a"), Replica("b")
    proxy = Proxy(a, b)
    turn, home = await proxy.route(session="s1")
    proxy.completed(turn, home)
    proxy.router.replica_queue_len_cache.update(home.replica_id, 1)
    for _ in range(3):
        request, replica = await proxy.route(session="s1")
        assert replica is home
        proxy.completed(request, replica)


async def test_a_turn_moves_when_its_home_is_full_then_stays() -> None:
    a, b = Replica("a"), Replica("b")
    proxy = Proxy(a, b)
    turn, home = await proxy.route(session="s1")
    proxy.completed(turn, home)
    away = b if home is a else a
    home.report(processing=1)  # another proxy's request holds the home's only slot
    away.report(processing=0)
    moved, replica = await proxy.route(session="s1")
    assert replica is away
    proxy.completed(moved, away)
    home.report(processing=0)  # free again, but the conversation's last turn is elsewhere now
    _, again = await proxy.route(session="s1")
    assert again is away


async def test_a_first_turn_is_learned_from_the_replicas_report() -> None:
    a, b = Replica("a"), Replica("b")
    proxy = Proxy(a, b)
    turn, home = await proxy.route()  # no session yet: the replica sets one
    proxy.completed(turn, home)
    home.report(processing=0, sessions={"s1": time.time()})
    (b if home is a else a).report(processing=0)
    for _ in range(3):  # ties rotate: only affinity keeps it there every time
        request, replica = await proxy.route(session="s1")
        assert replica is home
        proxy.completed(request, replica)


@pytest.mark.parametrize(("longest_request_s", "expected"), [(60.0, "b"), (0.0, "a")])
async def test_a_pick_never_sent_is_forgotten_after_the_longest_request(
    longest_request_s: float, expected: str
) -> None:
    """Ray never completes a request whose client left while it was being routed: its pick holds the
    replica's slot only as long as a request may run."""
    a, b = Replica("a"), Replica("b")
    a.report(processing=0, sessions={"s1": time.time()})
    proxy = Proxy(a, b)
    proxy.router.initialize_state(longest_request_s=longest_request_s)
    _, replica = await proxy.route(session="s1", send=False)  # never sent, so never completed
    assert replica is a
    time.sleep(0.01)  # the pick ages past a zero longest_request_s
    _, replica = await proxy.route(session="s2")
    assert replica.replica_id.unique_id == expected


async def test_a_request_ray_sends_to_a_lower_rank_counts_there() -> None:
    """Ray sends to the next rank when the first one's queue length probe times out (a loaded machine): the
    request holds that replica's slot, not the pick's."""
    a, b = Replica("a"), Replica("b")
    proxy = Proxy(a, b)
    request, held = await proxy.route(rank=1)
    free = a if held is b else b
    for _ in range(2):  # ties would rotate: only the count keeps the next requests off the held replica
        other, replica = await proxy.route()
        assert replica is free
        proxy.completed(other, replica)
    proxy.completed(request, held)


@pytest.mark.parametrize("lagging", range(4))
@pytest.mark.parametrize("turn", range(2))
async def test_a_burst_sent_as_the_last_round_ends_lands_on_the_free_slots(turn: int, lagging: int) -> None:
    """Ray reports a completion only after the client saw the last byte: a round sent at that instant finds one
    of the last round's requests still counted. 2 replicas x 2 slots, 4 requests a round: 2 and 2, not 3 and 1
    (one request queued for a whole reply beside an idle slot)."""
    a, b = Replica("a", slots=2), Replica("b", slots=2)
    proxy = Proxy(a, b)
    proxy.router._turn = turn
    last_round = [await proxy.route() for _ in range(4)]
    assert collections.Counter(replica.replica_id.unique_id for _, replica in last_round) == {"a": 2, "b": 2}
    for index, (request_id, replica) in enumerate(last_round):
        if index != lagging:  # its completion is still on its way to the router
            proxy.completed(request_id, replica)
    burst = [await proxy.route() for _ in range(4)]
    assert collections.Counter(replica.replica_id.unique_id for _, replica in burst) == {"a": 2, "b": 2}
