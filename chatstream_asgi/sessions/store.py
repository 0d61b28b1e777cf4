"""The session record, the store protocol and the in-memory store.

Stores keep :class:`Session` records as JSON-able dicts, so the in-memory store here and
:class:`~chatstream_asgi.sessions.redis_store.RedisSessionStore` behave alike.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
import weakref
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

__all__ = ["MemorySessionStore", "Session", "SessionStore", "StoredMessage", "apply_change", "update_session"]

StoredMessage = dict[str, Any]
"""A message in a session's history: ``{"id", "role", "content"}``, ``"tokens"`` (its token
count, so that fitting a long history needs no re-tokenizing), and ``"feedback"`` once given."""


@dataclass
class Session:
    """One client's state: the conversation so far and its own generation defaults."""

    id: str
    messages: list[StoredMessage] = field(default_factory=list)
    generation_params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able copy."""
        return {
            "id": self.id,
            "messages": [dict(m) for m in self.messages],
            "generation_params": dict(self.generation_params),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Session:
        """The session :meth:`to_dict` described."""
        return cls(
            id=data["id"],
            messages=[dict(m) for m in data.get("messages", ())],
            generation_params=dict(data.get("generation_params", {})),
        )

    def is_empty(self) -> bool:
        """Whether there is nothing to keep: no message and no parameter of its own."""
        return not self.messages and not self.generation_params


T = TypeVar("T")
Change = Callable[[Session], T]
"""Changes a session in place and returns what the caller wants back; may run more than once
(a compare-and-swap store retries it on a conflicting write), so it must not act outside the session."""


@runtime_checkable
class SessionStore(Protocol):
    """Where sessions live. ``load`` returns None for unknown or expired ids.

    A store may also offer ``async update(session_id, change)``, an atomic :func:`update_session`
    (the Redis store's is a compare-and-swap); stores without one are updated under a per-session lock.
    """

    async def load(self, session_id: str) -> Session | None: ...

    async def save(self, session: Session) -> None: ...

    async def delete(self, session_id: str) -> None: ...


def apply_change(session_id: str, stored: Session | None, change: Change[T]) -> tuple[T, Session | None]:
    """Apply ``change`` to the stored session (a fresh one when none): its result, and the session to
    save, or None when nothing changed or a session that never was stored is still empty."""
    session = stored if stored is not None else Session(session_id)
    before = session.to_dict()
    result = change(session)
    if session.to_dict() == before or (stored is None and session.is_empty()):
        return result, None
    return result, session


class _SessionLocks:
    """One lock per session id, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, session_id: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(session_id, (None, 0))
        lock = lock or asyncio.Lock()
        self._locks[session_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[session_id]
            if users == 1:
                del self._locks[session_id]
            else:
                self._locks[session_id] = (lock, users - 1)


_LOCKS: weakref.WeakKeyDictionary[Any, _SessionLocks] = weakref.WeakKeyDictionary()


async def update_session(store: SessionStore, session_id: str, change: Change[T]) -> T:
    """Load, change and save one session so that concurrent updates never lose one another.

    Uses the store's own atomic ``update`` when it has one; otherwise updates of one session are
    serialized in this process. Nothing is saved when ``change`` changed nothing, nor for a session
    that was never stored and is still empty: a client that said nothing costs no storage.
    """
    update = getattr(store, "update", None)
    if update is not None:
        return await update(session_id, change)  # type: ignore[no-any-return]
    locks = _LOCKS.get(store)
    if locks is None:
        locks = _LOCKS[store] = _SessionLocks()
    async with locks.hold(session_id):
        result, changed = apply_change(session_id, await store.load(session_id), change)
        if changed is not None:
            await store.save(changed)
        return result


class MemorySessionStore:
    """Sessions in this process: expire ``ttl`` seconds after last use; at most ``max_sessions``.

    Over the limit, the least recently used session *without a conversation* goes first (one that
    only holds parameters); conversations go only when no such session is left. Creating sessions
    is cheap (any client can set a parameter), holding a conversation costs a generation: so a
    flood of new clients cannot evict the history of real ones. The embedded default; use a shared
    store for replicas.
    """

    def __init__(self, *, ttl: float = 3600.0, max_sessions: int = 10_000) -> None:
        if ttl <= 0 or max_sessions < 1:
            raise ValueError("ttl must be positive and max_sessions at least 1")
        self.ttl = ttl
        self.max_sessions = max_sessions
        # Sessions holding a conversation, and the others (parameters only), each in LRU order.
        self._conversations: collections.OrderedDict[str, tuple[float, dict[str, Any]]] = collections.OrderedDict()
        self._others: collections.OrderedDict[str, tuple[float, dict[str, Any]]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._conversations) + len(self._others)

    def _tier(self, session_id: str) -> collections.OrderedDict[str, tuple[float, dict[str, Any]]] | None:
        if session_id in self._conversations:
            return self._conversations
        return self._others if session_id in self._others else None

    async def load(self, session_id: str) -> Session | None:
        tier = self._tier(session_id)
        if tier is None:
            return None
        expires_at, data = tier[session_id]
        now = time.monotonic()
        if expires_at <= now:
            del tier[session_id]
            return None
        tier[session_id] = (now + self.ttl, data)
        tier.move_to_end(session_id)
        return Session.from_dict(data)

    async def save(self, session: Session) -> None:
        await self.delete(session.id)
        tier = self._conversations if session.messages else self._others
        tier[session.id] = (time.monotonic() + self.ttl, session.to_dict())
        while len(self) > self.max_sessions:
            (self._others or self._conversations).popitem(last=False)

    async def delete(self, session_id: str) -> None:
        self._conversations.pop(session_id, None)
        self._others.pop(session_id, None)
