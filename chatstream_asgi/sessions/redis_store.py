"""A session store in Redis or Valkey, for several replicas sharing sessions.

Needs the ``redis`` client (the ``redis`` extra; from a checkout: ``pip install -e '.[redis]'``)::

    store = RedisSessionStore.from_url("redis://localhost:6379/0", ttl=3600)
    chat_stream = ChatStream(engine, session_store=store, session_secret=os.environ["CHATSTREAM_SECRET"])

Every replica must use the same ``session_secret``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from chatstream_asgi.sessions.store import Session

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["RedisSessionStore"]


class RedisSessionStore:
    """Sessions as JSON strings under ``prefix + id``; each expires ``ttl`` seconds after last use."""

    def __init__(self, client: Redis, *, ttl: int = 3600, prefix: str = "chatstream:session:") -> None:
        if ttl < 1:
            raise ValueError("ttl must be at least one second")
        self.client = client
        self.ttl = ttl
        self.prefix = prefix

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> RedisSessionStore:
        """A store on a new ``redis.asyncio`` client for ``url``."""
        from redis.asyncio import Redis

        return cls(Redis.from_url(url), **kwargs)

    async def load(self, session_id: str) -> Session | None:
        raw = await self.client.getex(self.prefix + session_id, ex=self.ttl)
        return None if raw is None else Session.from_dict(json.loads(raw))

    async def save(self, session: Session) -> None:
        await self.client.set(self.prefix + session.id, json.dumps(session.to_dict(), ensure_ascii=False), ex=self.ttl)

    async def delete(self, session_id: str) -> None:
        await self.client.delete(self.prefix + session_id)

    async def close(self) -> None:
        """Close the client's connections."""
        await self.client.aclose()
