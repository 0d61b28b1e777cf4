"""``EnginePool``: one engine in front of several, routing each request to the least-loaded one.

A member's load is the larger of what the pool itself sees (the streams it handed to that member
that have not yet finished or been cancelled) and what the member reports about itself, polled
every ``load_interval`` seconds from members that report one (``probe_load()``: a remote's ``/get_load``,
``/slots`` or ``/metrics``, see :meth:`~chatstream_asgi.OpenAIEngine.probe_load`), plus the
streams the pool opened or closed there since. The report counts every client of that remote, so
several front replicas sharing the same remotes balance correctly. With a reported capacity, load
is relative to it, and a member with a free slot goes first. Ties go round robin. A member whose request failed with
:class:`~chatstream_asgi.EngineUnavailable` (a remote that cannot be reached) is
skipped for ``cooldown`` seconds, then tried again. A request whose member fails that way, or
answers :class:`~chatstream_asgi.EngineOverloaded`, before any text is retried
once on each other member; after the first delta, errors reach the caller as they are.

A member whose generation fails (a local engine whose step raised: a failing GPU) fails only the
requests it holds; the pool then routes around it for ``cooldown`` seconds, doubling with each
failure in a row (up to ``max_cooldown``) and back to one cooldown once it serves a reply. Such a
request is not retried elsewhere: the failure may be the request's own, and retrying it could take
every member down. :meth:`members` says which members are down and why (``/get_load``, the metrics).

Session affinity: a request with a ``session_key`` goes to the member that served that
conversation's last turn, whose prefix cache still holds its keys and values (KV is local to a
process), when that member is healthy and has a free slot (``active < max_batch_size`` where the
member tells its slots; else when it is among the least loaded); otherwise the usual choice, which
then simply misses the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from chatstream_asgi.engines.base import (
    ChatMessage,
    Engine,
    EngineError,
    GenerationParams,
    GenerationRequest,
    GenerationStream,
    MemberStatus,
    RemoteLoad,
    TokenLogprob,
    ToolSpec,
    without_credentials,
)
from chatstream_asgi.engines.remote import EngineOverloaded, EngineRefused, EngineUnavailable

__all__ = ["EnginePool"]

logger = logging.getLogger("chatstream_asgi.pool")

_AFFINITY_KEYS = 65536  # conversations remembered (least recently routed forgotten first)


class EnginePool(Engine):
    """An :class:`~chatstream_asgi.Engine` over ``engines`` (remote or local, mixed freely).

    Every member of the engine contract is forwarded: ``model_name`` defaults to the first member's;
    ``context_len`` is the smallest member's; :meth:`render_prompt`, :meth:`count_tokens` and
    ``default_generation_params`` are the first member's, so members should serve the same model;
    ``max_batch_size`` is the members' total (None when one has no fixed number), ``kv_cache_usage``
    their mean, the prefix counters their sums; :meth:`release_session` frees the conversation on
    every member. :attr:`active`, :attr:`reported` and :attr:`healthy` show the pool's view per
    member. ``load_interval=None`` turns polling off (route by the pool's own counts only).
    """

    def __init__(
        self,
        engines: Sequence[Engine],
        *,
        cooldown: float = 10.0,
        max_cooldown: float = 300.0,
        model_name: str | None = None,
        load_interval: float | None = 1.0,
    ) -> None:
        if not engines:
            raise ValueError("EnginePool needs at least one engine")
        self.engines = list(engines)
        self.cooldown = cooldown
        self.max_cooldown = max_cooldown
        self.load_interval = load_interval
        self._model_name = model_name
        self._active = [0] * len(self.engines)
        self._reported: list[tuple[RemoteLoad, int] | None] = [None] * len(self.engines)  # (report, own count then)
        self._down_until = [0.0] * len(self.engines)
        self._failures = [0] * len(self.engines)  # failed generations in a row, per member
        self._errors = [""] * len(self.engines)  # what put each member down last
        self._next = 0
        self._affinity: OrderedDict[str, int] = OrderedDict()  # session key -> member that served it last
        self._lock = threading.Lock()  # GenerationStream.cancel may come from any thread
        self._poller: asyncio.Task[None] | None = None

    @property
    def model_name(self) -> str:
        return self._model_name or self.engines[0].model_name

    @property
    def context_len(self) -> int:
        return min(engine.context_len for engine in self.engines)

    @property
    def default_generation_params(self) -> Mapping[str, Any]:  # type: ignore[override]
        return self.engines[0].default_generation_params

    @property
    def max_batch_size(self) -> int | None:  # type: ignore[override]
        slots = [engine.max_batch_size for engine in self.engines]
        return None if None in slots else sum(slots)  # type: ignore[arg-type]

    @property
    def kv_cache_usage(self) -> float:  # type: ignore[override]
        return sum(engine.kv_cache_usage for engine in self.engines) / len(self.engines)

    @property
    def active(self) -> tuple[int, ...]:
        """Open streams per member."""
        return tuple(self._active)

    @property
    def reported(self) -> tuple[RemoteLoad | None, ...]:
        """Per member: its last report of its own load (None: it reports none, or not yet)."""
        return tuple(report[0] if report else None for report in self._reported)

    @property
    def healthy(self) -> tuple[bool, ...]:
        """Per member: False while it cools down after a connection failure or a failed generation."""
        now = time.monotonic()
        return tuple(until <= now for until in self._down_until)

    def members(self) -> tuple[MemberStatus, ...]:
        now = time.monotonic()
        with self._lock:
            return tuple(
                MemberStatus(
                    where=without_credentials(engine.where or f"member {i}"),
                    healthy=self._down_until[i] <= now,
                    active=self._active[i],
                    retry_in=round(max(self._down_until[i] - now, 0.0), 3),
                    error=without_credentials(self._errors[i]) if self._down_until[i] > now else "",
                )
                for i, engine in enumerate(self.engines)
            )

    async def start(self) -> None:
        """Start every member, then poll the loads of those that report one."""
        await asyncio.gather(*(engine.start() for engine in self.engines))
        if self.load_interval and self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll_loads(self.load_interval))

    async def refresh_loads(self) -> None:
        """Ask every member for its own report of its load, now (members that report none give None)."""
        loads = await asyncio.gather(*(engine.probe_load() for engine in self.engines), return_exceptions=True)
        with self._lock:
            for i, load in enumerate(loads):
                self._reported[i] = (load, self._active[i]) if isinstance(load, RemoteLoad) else None

    async def _poll_loads(self, interval: float) -> None:
        while True:
            try:
                await self.refresh_loads()
            except Exception:  # a member's probe must not end the polling
                logger.exception("polling the members' loads failed")
            await asyncio.sleep(interval)

    async def shutdown(self) -> None:
        """Shut every member down (all of them, even if one fails); re-raises the first failure."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        results = await asyncio.gather(*(engine.shutdown() for engine in self.engines), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]

    def generate(self, request: GenerationRequest) -> GenerationStream:
        """A stream from the least-loaded healthy member."""
        return _PoolStream(self, request)

    def prepare(self, request: GenerationRequest) -> GenerationRequest:
        """Prepared by the member that served the conversation last (its session ids; see
        :meth:`_acquire`), else by the first, as :meth:`render_prompt` renders: the members share a model."""
        with self._lock:
            last = self._affinity.get(request.session_key) if request.session_key else None
        return self.engines[last if last is not None else 0].prepare(request)

    def render_prompt(
        self,
        messages: Sequence[ChatMessage],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[ToolSpec] | None = None,
    ) -> str:
        extra = {"tools": tools} if tools else {}  # only to a member whose template takes them
        return self.engines[0].render_prompt(messages, add_generation_prompt=add_generation_prompt, **extra)

    def count_tokens(self, messages: Sequence[ChatMessage], *, tools: Sequence[ToolSpec] | None = None) -> int:
        extra = {"tools": tools} if tools else {}
        return self.engines[0].count_tokens(messages, **extra)

    @property
    def tool_call_format(self) -> str | None:  # type: ignore[override]
        """The members' format where they all share one (a request may go to any of them), else None."""
        formats = {engine.tool_call_format for engine in self.engines}
        return formats.pop() if len(formats) == 1 else None

    def check_params(self, params: GenerationParams) -> None:
        """Every member must serve ``params``: a request may go to any of them."""
        for engine in self.engines:
            engine.check_params(params)

    @property
    def prefix_hit_tokens(self) -> int:  # type: ignore[override]
        """Prompt tokens the members reused from their prefix caches."""
        return sum(e.prefix_hit_tokens for e in self.engines)

    @property
    def prefill_tokens(self) -> int:  # type: ignore[override]
        """Prompt tokens the members computed."""
        return sum(e.prefill_tokens for e in self.engines)

    def release_session(self, session_key: str) -> int:
        """Forget the conversation's member and free what the members hold for it (tokens freed)."""
        with self._lock:
            self._affinity.pop(session_key, None)
        return sum(e.release_session(session_key) for e in self.engines)

    # -- routing ----------------------------------------------------------------------------

    def _load(self, index: int) -> tuple[bool, float]:
        """(no free slot, load): the larger of the pool's count and the member's report brought up to date
        with the streams the pool opened or closed there since; relative to its slots when it reports them."""
        own = self._active[index]
        report = self._reported[index]
        if report is None:
            return False, own
        load, own_then = report
        busy = max(own, load.busy + own - own_then)
        if load.capacity:
            return busy >= load.capacity, busy / load.capacity
        return False, busy

    def _acquire(self, tried: set[int], session_key: str | None = None) -> int | None:
        """Pick and count a member not in ``tried``: the session's last member while it has a free slot
        (its prefix cache holds the conversation), else healthy first, least loaded, ties round robin."""
        n = len(self.engines)
        with self._lock:
            now = time.monotonic()
            left = [i for i in range(n) if i not in tried]
            candidates = [i for i in left if self._down_until[i] <= now] or left  # all down: try anyway
            if not candidates:
                return None
            index = min(candidates, key=lambda i: (*self._load(i), (i - self._next) % n))
            last = self._affinity.get(session_key) if session_key else None
            if last in candidates and not self._load(last)[0] and self._has_room(last, self._active[index]):
                index = last
            else:
                self._next = (index + 1) % n
            if session_key:
                self._affinity[session_key] = index
                self._affinity.move_to_end(session_key)
                if len(self._affinity) > _AFFINITY_KEYS:
                    self._affinity.popitem(last=False)
            self._active[index] += 1
            return index

    def _has_room(self, index: int, least: int) -> bool:
        """A free slot on member ``index`` (its ``max_batch_size`` if it has one, else no more load than ``least``)."""
        slots = self.engines[index].max_batch_size
        return self._active[index] < slots if slots is not None else self._active[index] <= least

    def _release(self, index: int) -> None:
        with self._lock:
            self._active[index] -= 1

    def _mark_down(self, index: int, error: BaseException) -> None:
        logger.warning("engine %d unavailable for %.1f s: %s", index, self.cooldown, error)
        with self._lock:
            self._down_until[index] = time.monotonic() + self.cooldown
            self._errors[index] = f"unavailable: {error}"

    def _mark_failing(self, index: int, error: BaseException) -> None:
        """Member ``index`` failed a generation: route around it, longer with each failure in a row (the
        requests a failing step ended together, while it is already down, are one failure)."""
        now = time.monotonic()
        with self._lock:
            self._errors[index] = f"generation failed: {error}"
            if self._down_until[index] > now:
                return
            self._failures[index] += 1
            pause = min(self.cooldown * 2 ** (self._failures[index] - 1), self.max_cooldown)
            self._down_until[index] = now + pause
        where = self.engines[index].where or f"member {index}"
        logger.warning("engine %d (%s) failed a generation; not routed to for %.0f s: %s", index, where, pause, error)

    def _mark_serving(self, index: int) -> None:
        """Member ``index`` finished a reply: its next failure counts from one again."""
        if self._failures[index]:
            with self._lock:
                self._failures[index] = 0


class _PoolStream(GenerationStream):
    """A member's stream, counted against that member until it ends or is cancelled."""

    def __init__(self, pool: EnginePool, request: GenerationRequest) -> None:
        super().__init__(request.request_id)
        self._pool = pool
        self._request = request
        self._tried: set[int] = set()
        self._counted = False
        self._yielded = False
        self.index = -1
        """The member serving this stream (its position in ``pool.engines``)."""
        self._inner = self._open()

    @property
    def engine(self) -> Engine:
        """The member serving this stream."""
        return self._pool.engines[self.index]

    def _open(self) -> GenerationStream:
        index = self._pool._acquire(self._tried, self._request.session_key)
        assert index is not None, "every member was tried"
        self.index = index
        self._tried.add(index)
        self._counted = True
        try:
            return self._pool.engines[index].generate(self._request)
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        with self._pool._lock:
            counted, self._counted = self._counted, False
        if counted:
            self._pool._release(self.index)

    def take_logprobs(self) -> list[TokenLogprob]:
        return self._inner.take_logprobs()

    def _copy_result(self, inner: GenerationStream) -> None:
        self.finish_reason = inner.finish_reason
        self.prompt_tokens = inner.prompt_tokens
        self.completion_tokens = inner.completion_tokens
        self.cached_tokens = inner.cached_tokens

    def cancel(self) -> None:
        super().cancel()
        self._inner.cancel()
        self._release()
        if self.finish_reason is None:  # a stream that already ended keeps its reason
            self._copy_result(self._inner)
            self.finish_reason = "cancelled"

    async def __anext__(self) -> str:
        while True:
            inner = self._inner
            try:
                text = await inner.__anext__()
            except StopAsyncIteration:
                self._release()
                self._copy_result(inner)
                if inner.finish_reason in ("stop", "length"):
                    self._pool._mark_serving(self.index)
                raise
            except (EngineUnavailable, EngineOverloaded) as exc:
                self._release()
                if isinstance(exc, EngineUnavailable):
                    self._pool._mark_down(self.index, exc)
                if self._yielded or self.cancelled or len(self._tried) == len(self._pool.engines):
                    self._copy_result(inner)
                    raise
                logger.info("request %s: engine %d failed (%s); trying another", self.request_id, self.index, exc)
                self._inner = self._open()
                continue
            except Exception as exc:
                self._release()
                self._copy_result(inner)
                if isinstance(exc, EngineError) and not isinstance(exc, EngineRefused) and not self.cancelled:
                    self._pool._mark_failing(self.index, exc)
                raise
            self._yielded = True
            self.completion_tokens = inner.completion_tokens
            return text
