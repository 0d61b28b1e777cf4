"""Engines for the Ray Serve tests, importable by Ray's worker processes (tests/support/apps is on their path)."""

from __future__ import annotations

from chatstream_asgi.engines.base import EngineError, GenerationRequest, GenerationStream
from chatstream_asgi.engines.mock import MockEngine, MockParams


class _Failing(GenerationStream):
    async def __anext__(self) -> str:
        self.finish_reason = "error"
        raise EngineError("the engine failed (asked to)")


class FailOnRequest(MockEngine):
    """The ``long`` mock at ``time_per_token`` seconds a token; a user message ``"fail"`` makes generation fail."""

    def generate(self, request: GenerationRequest) -> GenerationStream:
        if request.messages[-1]["content"] == "fail":
            return _Failing(request.request_id)
        return super().generate(request)


def long_mock(time_per_token: float = 0.05) -> FailOnRequest:
    return FailOnRequest(MockParams(type="long", time_per_token_sec=time_per_token))


async def record_state(path: str, request: object, state: str) -> None:
    """A completion callback for a replica (another process): appends each state to the file ``path``."""
    with open(path, "a", encoding="utf-8") as states:
        states.write(f"{getattr(state, 'value', state)}\n")


def announcing_app(chat_stream: object) -> object:
    """The default app, which first creates the file that a request's ``x-test-arrived`` header names: a
    test awaits that file to know its request reached the replica (Ray's proxy hands it on when it will)."""
    from pathlib import Path

    from chatstream_asgi.web.app import create_app

    app = create_app(chat_stream)

    async def announcing(scope: dict, receive: object, send: object) -> None:
        if scope["type"] == "http":
            for name, value in scope["headers"]:
                if name == b"x-test-arrived":
                    Path(value.decode()).touch()
        await app(scope, receive, send)

    return announcing
