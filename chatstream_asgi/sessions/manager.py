"""Sessions: signed session tokens, and opening a request's session from its headers.

A session id is 128 random bits issued by the server; clients hold it as a *token*
``<id>.<signature>`` (HMAC-SHA256 with the server's secret), in the ``chatstream_session``
cookie (``HttpOnly; SameSite=Lax``, ``Secure`` when configured) or, for API clients, in the
``X-Session-Id`` request header. Every response that uses a session carries the token in an
``X-Session-Id`` response header. A token with a bad signature starts a fresh session with a new
id; a valid token whose session is unknown or expired starts a fresh, empty session under the
same id (only its holder can present it). Nobody can guess or forge someone else's id.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass
from http.cookies import SimpleCookie
from typing import Any

from chatstream_asgi.sessions.store import MemorySessionStore, Session, SessionStore

__all__ = ["OpenSession", "SessionManager", "request_token", "session_id_of"]

logger = logging.getLogger("chatstream_asgi")

SESSION_HEADER = b"x-session-id"


def request_token(headers: Iterable[tuple[bytes, bytes]], cookie_name: str) -> tuple[str | None, bool]:
    """The session token in ASGI request ``headers`` (``X-Session-Id`` first, then the cookie
    ``cookie_name``) and whether it came in the cookie; ``(None, False)`` when there is none."""
    cookie_header = None
    for name, value in headers:
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
        morsel = cookies.get(cookie_name)
        if morsel is not None:
            return morsel.value, True
    return None, False


def session_id_of(token: str) -> str:
    """The session id a token names, unverified (routing only: a forged id routes, it opens nothing)."""
    return token.partition(".")[0]


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
        session_id = session_id_of(token)
        if not session_id or len(token) > 128 or not token.isascii():
            return None  # our tokens are ASCII: anything else is forged (and compare_digest needs bytes)
        return session_id if hmac.compare_digest(self.sign(session_id).encode(), token.encode()) else None

    def client_token(self, scope: MutableMapping[str, Any]) -> tuple[str | None, bool]:
        """The token a request presents (``X-Session-Id`` first, then the cookie) and whether
        it came in the cookie."""
        return request_token(scope.get("headers", ()), self.cookie_name)

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
