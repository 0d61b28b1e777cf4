"""The session record, the store protocol and the in-memory store.

Stores keep :class:`Session` records as JSON-able dicts, so the in-memory store here and
:class:`~chatstream_asgi.sessions.redis_store.RedisSessionStore` behave alike.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = ["MemorySessionStore", "Session", "SessionStore", "StoredMessage"]

StoredMessage = dict[str, Any]
"""A message in a session's history: ``{"id", "role", "content"}``, and ``"feedback"`` once given."""


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


@runtime_checkable
class SessionStore(Protocol):
    """Where sessions live. ``load`` returns None for unknown or expired ids."""

    async def load(self, session_id: str) -> Session | None: ...

    async def save(self, session: Session) -> None: ...

    async def delete(self, session_id: str) -> None: ...


class MemorySessionStore:
    """Sessions in this process: expire ``ttl`` seconds after last use; at most ``max_sessions``
    (the least recently used go first). The embedded default; use a shared store for replicas."""

    def __init__(self, *, ttl: float = 3600.0, max_sessions: int = 10_000) -> None:
        if ttl <= 0 or max_sessions < 1:
            raise ValueError("ttl must be positive and max_sessions at least 1")
        self.ttl = ttl
        self.max_sessions = max_sessions
        self._items: collections.OrderedDict[str, tuple[float, dict[str, Any]]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    async def load(self, session_id: str) -> Session | None:
        item = self._items.get(session_id)
        if item is None:
            return None
        expires_at, data = item
        now = time.monotonic()
        if expires_at <= now:
            del self._items[session_id]
            return None
        self._items[session_id] = (now + self.ttl, data)
        self._items.move_to_end(session_id)
        return Session.from_dict(data)

    async def save(self, session: Session) -> None:
        self._items[session.id] = (time.monotonic() + self.ttl, session.to_dict())
        self._items.move_to_end(session.id)
        while len(self._items) > self.max_sessions:
            self._items.popitem(last=False)

    async def delete(self, session_id: str) -> None:
        self._items.pop(session_id, None)
