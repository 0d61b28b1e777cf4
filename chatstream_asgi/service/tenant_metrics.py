"""Per-tenant metrics, ``chatstream_tenant_*``, with a bounded number of tenant labels.

Tenants can be as many as API keys or users, so the ``tenant`` label names only the busiest
``named`` of them (by requests, admitted and refused, counted with the Space-Saving algorithm in
bounded memory and halved now and then so that yesterday's busiest fade); every other tenant is
counted under ``tenant="other"``. A tenant joins the named ones when a place is free or when it has
become twice as busy as the least busy named one, which then goes back into ``other``: its series
ends, what it had counted moves into ``other`` (counters only rise), and a tenant named again
starts from zero. Labels are tenant names (:func:`~chatstream_asgi.service.tenants.tenant_name`),
never keys.

=============================================  ========  =====================================================
metric                                         type      labels
=============================================  ========  =====================================================
``chatstream_tenant_admitted_total``           counter   tenant: requests granted a slot or a queue place
``chatstream_tenant_rejected_total``           counter   tenant, reason (``queue_full``, ``tenant_limit``)
``chatstream_tenant_queued_seconds``           summary   tenant: time from arrival to a slot
``chatstream_tenant_tokens_total``             counter   tenant, kind (``prompt``, ``generated``)
``chatstream_tenant_active``                   gauge     tenant: replies generating now
``chatstream_tenant_waiting``                  gauge     tenant: requests queued now
=============================================  ========  =====================================================
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily

__all__ = ["OTHER", "TenantMetrics"]

OTHER = "other"
_DECAY_EVERY = 10_000
"""Every this many requests the busyness counts are halved."""


@dataclass
class _Tally:
    admitted: int = 0
    rejected: collections.Counter[str] = field(default_factory=collections.Counter)
    queued: int = 0
    queued_seconds: float = 0.0
    prompt_tokens: int = 0
    generated_tokens: int = 0

    def absorb(self, other: _Tally) -> None:
        self.admitted += other.admitted
        self.rejected.update(other.rejected)
        self.queued += other.queued
        self.queued_seconds += other.queued_seconds
        self.prompt_tokens += other.prompt_tokens
        self.generated_tokens += other.generated_tokens


class TenantMetrics:
    """Admission's observer: tallies per named tenant and for ``other``, exported at scrape time.

    ``load(tenant) -> (active, queued)`` and ``totals() -> (active, queued)`` give the gauges.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        named: int = 20,
        load: Callable[[str], tuple[int, int]] | None = None,
        totals: Callable[[], tuple[int, int]] | None = None,
    ) -> None:
        self.limit = named
        self.load = load
        self.totals = totals
        self.named: dict[str, _Tally] = {}
        self.other = _Tally()
        self._busy: dict[str, int] = {}
        self._capacity = max(64, 8 * named)
        self._events = 0
        registry.register(self)

    # -- the observer -------------------------------------------------------------------------

    def admitted(self, tenant: str) -> None:
        self._tally(tenant, count=True).admitted += 1

    def rejected(self, tenant: str, reason: str) -> None:
        self._tally(tenant, count=True).rejected[reason] += 1

    def started(self, tenant: str, waited: float) -> None:
        tally = self._tally(tenant)
        tally.queued += 1
        tally.queued_seconds += waited

    def finished(self, tenant: str, prompt_tokens: int, completion_tokens: int) -> None:
        tally = self._tally(tenant)
        tally.prompt_tokens += prompt_tokens
        tally.generated_tokens += completion_tokens

    # -- labels -------------------------------------------------------------------------------

    def _tally(self, tenant: str, *, count: bool = False) -> _Tally:
        if count:
            self._count(tenant)
        tally = self.named.get(tenant)
        if tally is not None:
            return tally
        if tenant == OTHER:  # a tenant of that name (hash_keys=False) must not export the label twice
            return self.other
        if len(self.named) < self.limit:
            tally = self.named[tenant] = _Tally()
            return tally
        if count and self.named:
            weakest = min(self.named, key=lambda name: self._busy.get(name, 0))
            if self._busy.get(tenant, 0) > 2 * self._busy.get(weakest, 0):
                self.other.absorb(self.named.pop(weakest))
                tally = self.named[tenant] = _Tally()
                return tally
        return self.other

    def _count(self, tenant: str) -> None:
        """Space-Saving: at most ``_capacity`` tenants counted; a newcomer takes the least count's place."""
        busy = self._busy
        if tenant in busy:
            busy[tenant] += 1
        elif len(busy) < self._capacity:
            busy[tenant] = 1
        else:
            least = min(busy, key=busy.__getitem__)
            busy[tenant] = busy.pop(least) + 1
        self._events += 1
        if self._events % _DECAY_EVERY == 0:
            for name in list(busy):
                busy[name] //= 2

    # -- the collector ------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        admitted = CounterMetricFamily(
            "chatstream_tenant_admitted", "Requests granted a slot or a queue place, by tenant.", labels=["tenant"]
        )
        rejected = CounterMetricFamily(
            "chatstream_tenant_rejected", "Requests refused by admission, by tenant.", labels=["tenant", "reason"]
        )
        queued = SummaryMetricFamily(
            "chatstream_tenant_queued_seconds", "From arrival to a generation slot, by tenant.", labels=["tenant"]
        )
        tokens = CounterMetricFamily(
            "chatstream_tenant_tokens", "Prompt and generated tokens served, by tenant.", labels=["tenant", "kind"]
        )
        active = GaugeMetricFamily("chatstream_tenant_active", "Replies generating, by tenant.", labels=["tenant"])
        waiting = GaugeMetricFamily("chatstream_tenant_waiting", "Requests queued, by tenant.", labels=["tenant"])
        named_active = named_waiting = 0
        for name, tally in [*self.named.items(), (OTHER, self.other)]:
            admitted.add_metric([name], tally.admitted)
            for reason, count in sorted(tally.rejected.items()):
                rejected.add_metric([name, reason], count)
            queued.add_metric([name], tally.queued, tally.queued_seconds)
            tokens.add_metric([name, "prompt"], tally.prompt_tokens)
            tokens.add_metric([name, "generated"], tally.generated_tokens)
            if name == OTHER:
                total_active, total_waiting = self.totals() if self.totals is not None else (0, 0)
                now_active, now_waiting = total_active - named_active, total_waiting - named_waiting
            else:
                now_active, now_waiting = self.load(name) if self.load is not None else (0, 0)
                named_active, named_waiting = named_active + now_active, named_waiting + now_waiting
            active.add_metric([name], now_active)
            waiting.add_metric([name], now_waiting)
        yield from (admitted, rejected, queued, tokens, active, waiting)

    def describe(self) -> list[Metric]:
        return []
