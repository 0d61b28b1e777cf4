"""The original library's extra APIs, served by :class:`~chatstream_asgi.ChatStreamMiddleware`.

JSON in, JSON out. Session endpoints use the session of the ``chatstream_session`` cookie or the
``X-Session-Id`` header (a fresh one when missing) and answer with ``X-Session-Id`` (and
``Set-Cookie`` for a new session). Errors: ``400 {"error": "invalid_request", "detail": ...}``
and ``503 {"error": "session_store_unavailable", ...}`` (both counted in
``chatstream_rejected_total``), ``404 {"error": "not_found", "detail": ...}``.

==========================  ======  ============================================================
endpoint                    method  request → response
==========================  ======  ============================================================
``/clear_context``          POST    → ``{"cleared": <number of messages removed>}``
``/get_prompt``             GET     → ``{"prompt": str, "messages": [{"id", "role", "content",
                                    "feedback"?}, ...]}``: the history and the prompt text it
                                    renders to (chat template, system prompt, oldest turns
                                    dropped when over the context budget)
``/get_load``               GET     → ``{"processing", "waiting", "max_processing",
                                    "max_waiting", "estimated_wait_seconds", "tenant"?}``
                                    (the wait and ``tenant`` are the caller's own)
``/set_generation_params``  POST    ``{"temperature"?, "top_k"?, "top_p"?,
                                    "repetition_penalty"?}`` (``null`` resets one) → the
                                    session's effective values, as ``get_generation_params``
``/get_generation_params``  GET     → ``{"temperature", "top_k", "top_p", "repetition_penalty"}``
``/set_feedback``           POST    ``{"message_id": str, "feedback": "like" | "dislike" | null}``
                                    → the same object; calls ``feedback_callback(request,
                                    message_id, feedback)``; 404 for an id that is no reply in
                                    this session
``/get_resource_usage``     GET     → ``{"process": {"pid", "rss_bytes"}, "cuda": [{"device",
                                    "name", "allocated_bytes", "reserved_bytes",
                                    "total_bytes"}, ...]}`` (``cuda`` is empty unless torch is
                                    already imported and CUDA is available)
``/metrics``                GET     Prometheus text format
==========================  ======  ============================================================
"""

from __future__ import annotations

import inspect
import os
import resource
import sys
from collections.abc import Mapping
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from chatstream_asgi.asgi.replay import SharedReceive, replay_request
from chatstream_asgi.asgi.responses import send_bytes, send_json
from chatstream_asgi.logs import logger
from chatstream_asgi.protocols.chat import InvalidRequest, load_json_object, validate_params
from chatstream_asgi.service.outcomes import Rejection
from chatstream_asgi.service.preparation import session_store_unavailable
from chatstream_asgi.service.prompts import public
from chatstream_asgi.service.tenants import TenantSource
from chatstream_asgi.sessions.store import Session, update_session
from chatstream_asgi.types import Receive, Scope, Send

if TYPE_CHECKING:
    from chatstream_asgi.server.chatstream import ChatStream
    from chatstream_asgi.sessions.manager import OpenSession

__all__ = ["SESSION_PARAMS", "ChatAPI", "resource_usage"]


SESSION_PARAMS = frozenset({"temperature", "top_k", "top_p", "repetition_penalty"})
"""Generation parameters a session can set as its defaults."""

FEEDBACK = frozenset({"like", "dislike"})


def _json_object(body: bytes) -> Mapping[str, Any]:
    """The request's JSON object; an empty body counts as ``{}``."""
    return load_json_object(body) if body.strip() else {}


def resource_usage() -> dict[str, Any]:
    """Process RSS, and CUDA memory per device when torch is already imported and CUDA is available."""
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the peak RSS is the best portable figure
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss = peak if sys.platform == "darwin" else peak * 1024
    cuda: list[dict[str, Any]] = []
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cuda.append(
                {
                    "device": i,
                    "name": torch.cuda.get_device_name(i),
                    "allocated_bytes": torch.cuda.memory_allocated(i),
                    "reserved_bytes": torch.cuda.memory_reserved(i),
                    "total_bytes": torch.cuda.get_device_properties(i).total_memory,
                }
            )
    return {"process": {"pid": os.getpid(), "rss_bytes": rss}, "cuda": cuda}


class ChatAPI:
    """Handlers of the extra endpoints (see the module docstring for their JSON)."""

    def __init__(self, chat_stream: ChatStream, tenant: TenantSource | None = None) -> None:
        self.cs = chat_stream
        self.tenant = tenant
        """The serving middleware's tenant source, if it has its own: whose load ``/get_load`` reports."""

    async def get_load(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        await send_json(send, 200, self.cs.get_load(scope, self.tenant))

    async def metrics(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        metrics = self.cs.metrics
        await send_bytes(send, 200, metrics.render(), metrics.content_type)

    async def get_resource_usage(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        await send_json(send, 200, resource_usage())

    async def clear_context(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        async with self._session(scope, send) as opened:
            _json_object(body)  # no fields, but a body must still be a JSON object

            def clear(session: Session) -> int:
                cleared = len(session.messages)
                session.messages = []
                return cleared

            cleared = await update_session(self.cs.sessions.store, opened.session.id, clear)
            self.cs.engine.release_session(opened.session.id)  # the engine's prefix cache entries
            await self._reply(send, opened, {"cleared": cleared})

    async def get_prompt(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        async with self._session(scope, send) as opened:
            history = opened.session.messages
            heavy = sum(len(m["content"]) for m in history) > self.cs.prompts.HEAVY_CHARS
            prompt = await self.cs.prompts.off_loop(lambda: self.cs.history_prompt(history), heavy=heavy)
            await self._reply(send, opened, {"prompt": prompt, "messages": public(history)})

    async def get_generation_params(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        async with self._session(scope, send) as opened:
            await self._reply(send, opened, self._effective(opened.session.generation_params))

    async def set_generation_params(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        async with self._session(scope, send) as opened:
            data = _json_object(body)
            resets = {k for k, v in data.items() if v is None}
            values = validate_params({k: v for k, v in data.items() if v is not None}, allowed=SESSION_PARAMS)
            unknown = resets - SESSION_PARAMS
            if unknown:
                raise InvalidRequest(f"generation_params.{min(unknown)} is not a known parameter")

            def update(session: Session) -> dict[str, Any]:
                params = session.generation_params
                params.update(values)
                for key in resets:
                    params.pop(key, None)
                return dict(params)

            params = await update_session(self.cs.sessions.store, opened.session.id, update)
            await self._reply(send, opened, self._effective(params))

    async def set_feedback(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        async with self._session(scope, send) as opened:
            data = _json_object(body)
            message_id, feedback = data.get("message_id"), data.get("feedback")
            if not isinstance(message_id, str) or not message_id:
                raise InvalidRequest("message_id must be a non-empty string")
            if feedback is not None and (not isinstance(feedback, str) or feedback not in FEEDBACK):
                raise InvalidRequest(f"feedback must be one of {sorted(FEEDBACK)} or null")

            def give(session: Session) -> bool:
                for message in session.messages:
                    if message["id"] == message_id and message["role"] == "assistant":
                        message["feedback"] = feedback
                        return True
                return False

            if not await update_session(self.cs.sessions.store, opened.session.id, give):
                headers = self.cs.sessions.headers(opened)
                detail = f"no reply with id {message_id!r} in this session"
                await send_json(send, 404, self.cs.chat_dialect.error(404, "not_found", detail), headers)
                return
            await self._feedback_callback(scope, receive, body, message_id, feedback)
            await self._reply(send, opened, {"message_id": message_id, "feedback": feedback})

    # -- helpers ----------------------------------------------------------------------------

    def _effective(self, params: Mapping[str, Any]) -> dict[str, Any]:
        defaults = asdict(self.cs.default_params)
        values = {k: defaults[k] for k in sorted(SESSION_PARAMS)}
        values.update(params)
        return values

    async def _reply(self, send: Send, opened: OpenSession, payload: Mapping[str, Any]) -> None:
        await send_json(send, 200, payload, self.cs.sessions.headers(opened))

    def _session(self, scope: Scope, send: Send) -> _SessionScope:
        return _SessionScope(self.cs, scope, send)

    async def _feedback_callback(
        self, scope: Scope, receive: Receive, body: bytes, message_id: str, feedback: str | None
    ) -> None:
        callback = self.cs.feedback_callback
        if callback is None:
            return
        shared = receive if isinstance(receive, SharedReceive) else SharedReceive(receive)
        try:
            outcome = callback(replay_request(scope, body, shared), message_id, feedback)
            if inspect.isawaitable(outcome):
                await outcome
        except Exception:
            logger.exception("feedback callback failed")


class _SessionScope:
    """Opens the request's session and turns an :class:`InvalidRequest` raised inside into a 400."""

    def __init__(self, chat_stream: ChatStream, scope: Scope, send: Send) -> None:
        self.cs = chat_stream
        self.scope = scope
        self.send = send
        self.opened: OpenSession | None = None

    async def __aenter__(self) -> OpenSession:
        try:
            self.opened = await self.cs.sessions.open(self.scope)
        except Exception:  # the session store failed (an unreachable Redis, say): 503, as on the chat path
            raise session_store_unavailable() from None
        return self.opened

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        if isinstance(exc, InvalidRequest):
            assert self.opened is not None
            headers = self.cs.sessions.headers(self.opened)
            rejection = Rejection(400, "invalid_request", exc.detail, headers=headers)
            await self.cs.outcomes.reject(self.send, self.cs.chat_dialect, rejection)
            return True
        return False
