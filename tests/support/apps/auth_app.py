"""Header auth outside ``ChatStreamMiddleware`` (README's "Where auth goes"), for real-server tests.

``Authorization: Bearer s3cret`` passes; anything else is a 401 before the body is read.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.authentication import AuthCredentials, AuthenticationBackend, AuthenticationError, SimpleUser
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse, Response

from chatstream_asgi import ChatStream, ChatStreamMiddleware, MockEngine, MockParams


class TokenBackend(AuthenticationBackend):
    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, SimpleUser] | None:
        if conn.url.path == "/get_load":  # the readiness probe
            return None
        if conn.headers.get("authorization") != "Bearer s3cret":
            raise AuthenticationError("a valid bearer token is required")
        return AuthCredentials(["authenticated"]), SimpleUser("alice")


def unauthorized(conn: HTTPConnection, exc: Exception) -> Response:
    return JSONResponse({"error": "unauthorized"}, status_code=401)


chat_stream = ChatStream(MockEngine(MockParams("echo", time_per_token_sec=0)), session_secret="test")
app = Starlette(
    middleware=[
        Middleware(AuthenticationMiddleware, backend=TokenBackend(), on_error=unauthorized),
        Middleware(ChatStreamMiddleware, chat_stream=chat_stream),
    ]
)
