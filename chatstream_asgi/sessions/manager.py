"""Sessions: signed session ids, the session store protocol and the in-memory store.

A session id is 128 random bits issued by the server; clients hold it as a *token*
``<id>.<signature>`` (HMAC-SHA256 with the server's secret), in the ``chatstream_session``
cookie (``HttpOnly; SameSite=Lax``, ``Secure`` when configured) or, for API clients, in the
``X-Session-Id`` request header. Every response that uses a session carries the token in an
``X-Session-Id`` response header. A token with a bad signature starts a fresh session with a new
id; a valid token whose session is unknown or expired starts a fresh, empty session under the
same id (only its holder can present it). Nobody can guess or forge someone else's id.

Stores keep :class:`Session` records as JSON-able dicts, so the in-memory store here and
:class:`~chatstream_asgi.redis_store.RedisSessionStore` behave alike.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from typing import Any, Protocol, runtime_checkable

__all__ = ["MemorySessionStore", "OpenSession", "Session", "SessionManager", "SessionStore", "StoredMessage"]

logger = logging.getLogger("chatstream_asgi")

StoredMessage = dict[str, Any]
"""A message in a session's history: ``{"id", "role", "content"}``, and ``"feedback"`` once given."""

SESSION_HEADER = b"x-session-id"


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


@dataclass
class OpenSession:
    """A session opened for one request, with the token the client should keep."""

    session: Session
    token: str
    set_cookie: bool
    """Whether the response must set the cookie (a new token, or the client sent none)."""


class SessionManager:
    """Issues and verifies session tokens and opens sessions from request headers.

    ``secret`` signs the tokens (share it between replicas); without one a random per-process
    secret is used and a warning logged: sessions then end with the process.
    """

    def __init__(
        self,
        store: SessionStore | None = None,
        secret: str | bytes | None = None,
        *,
        cookie_name: str = "chatstream_session",
        cookie_secure: bool = False,
        cookie_path: str = "/",
    ) -> None:
        if secret is None:
            logger.warning(
                "no session_secret given: session tokens are signed with a random per-process secret "
                "and stop working on restart or on another replica"
            )
            secret = secrets.token_bytes(32)
        self._key = secret.encode() if isinstance(secret, str) else secret
        self.store: SessionStore = store if store is not None else MemorySessionStore()
        self.cookie_name = cookie_name
        self.cookie_secure = cookie_secure
        self.cookie_path = cookie_path

    def sign(self, session_id: str) -> str:
        """The token for ``session_id``."""
        digest = hmac.new(self._key, b"chatstream-session:" + session_id.encode(), hashlib.sha256).digest()
        return f"{session_id}.{base64.urlsafe_b64encode(digest).rstrip(b'=').decode()}"

    def verify(self, token: str) -> str | None:
        """The session id a token names, or None when it is malformed or its signature is wrong."""
        session_id, _, _ = token.partition(".")
        if not session_id or len(token) > 128:
            return None
        return session_id if hmac.compare_digest(self.sign(session_id), token) else None

    def client_token(self, scope: MutableMapping[str, Any]) -> tuple[str | None, bool]:
        """The token a request presents (``X-Session-Id`` first, then the cookie) and whether
        it came in the cookie."""
        cookie_header = None
        for name, value in scope.get("headers", ()):
            if name == SESSION_HEADER:
                return value.decode("latin-1").strip(), False
            if name == b"cookie":
                cookie_header = value.decode("latin-1")
        if cookie_header:
            cookies: SimpleCookie = SimpleCookie()
            try:
                cookies.load(cookie_header)
            except Exception:  # a malformed Cookie header: treat as absent
                return None, False
            morsel = cookies.get(self.cookie_name)
            if morsel is not None:
                return morsel.value, True
        return None, False

    async def open(self, scope: MutableMapping[str, Any]) -> OpenSession:
        """The request's session; a fresh one when its token is missing, tampered or unknown."""
        token, from_cookie = self.client_token(scope)
        session_id = self.verify(token) if token else None
        if session_id is None:
            session_id = secrets.token_urlsafe(16)
            token = self.sign(session_id)
            from_cookie = False
        assert token is not None
        session = await self.store.load(session_id)
        return OpenSession(session or Session(session_id), token, set_cookie=not from_cookie)

    def headers(self, opened: OpenSession) -> list[tuple[bytes, bytes]]:
        """Response headers that hand the client its token."""
        headers = [(SESSION_HEADER, opened.token.encode())]
        if opened.set_cookie:
            cookie = f"{self.cookie_name}={opened.token}; Path={self.cookie_path}; HttpOnly; SameSite=Lax"
            if self.cookie_secure:
                cookie += "; Secure"
            headers.append((b"set-cookie", cookie.encode()))
        return headers
