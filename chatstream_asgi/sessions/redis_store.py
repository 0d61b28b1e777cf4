"""A session store in Redis or Valkey, for several replicas sharing sessions.

Needs the ``redis`` client (the ``redis`` extra; from a checkout: ``pip install -e '.[redis]'``)::

    store = RedisSessionStore.from_url("redis://localhost:6379/0", ttl=3600)
    chat_stream = ChatStream(engine, session_store=store, session_secret=os.environ["CHATSTREAM_SECRET"])

Every replica must use the same ``session_secret``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from chatstream_asgi.sessions.store import Change, Session, T, apply_change

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["RedisSessionStore"]

MAX_RETRIES = 32
"""Compare-and-swap attempts of one :meth:`RedisSessionStore.update` before it gives up."""


class RedisSessionStore:
    """Sessions as JSON strings under ``prefix + id``; each expires ``ttl`` seconds after last use.
    Updates are atomic (:meth:`update`), so replicas and concurrent requests never lose one."""

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

    async def update(self, session_id: str, change: Change[T]) -> T:
        """Compare-and-swap: ``WATCH`` the key, apply ``change``, write in ``MULTI``/``EXEC``; when
        another replica or request wrote the session in between, read it again and retry."""
        from redis.exceptions import WatchError

        key = self.prefix + session_id
        async with self.client.pipeline(transaction=True) as pipe:
            for _ in range(MAX_RETRIES):
                try:
                    await pipe.watch(key)
                    raw = await pipe.get(key)
                    stored = None if raw is None else Session.from_dict(json.loads(raw))
                    result, changed = apply_change(session_id, stored, change)
                    if changed is None:
                        await pipe.reset()
                        return result
                    pipe.multi()
                    pipe.set(key, json.dumps(changed.to_dict(), ensure_ascii=False), ex=self.ttl)
                    await pipe.execute()
                    return result
                except WatchError:
                    continue
        raise RuntimeError(f"session {session_id} changed under {MAX_RETRIES} updates in a row")

    async def delete(self, session_id: str) -> None:
        await self.client.delete(self.prefix + session_id)

    async def close(self) -> None:
        """Close the client's connections."""
        await self.client.aclose()
