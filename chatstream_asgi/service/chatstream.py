"""The front door: validation, admission and the completion callback around the send loop."""

from __future__ import annotations

import inspect
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
from prometheus_client import CollectorRegistry
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from chatstream_asgi.asgi.responses import send_json
from chatstream_asgi.asgi.sendloop import Reply
from chatstream_asgi.engines.base import Engine, GenerationParams, GenerationRequest, Message
from chatstream_asgi.engines.mock import MockEngine, MockParams
from chatstream_asgi.protocols.framing import FORMATS, Framer
from chatstream_asgi.service.admission import Admission, QueueFull
from chatstream_asgi.service.metrics import Metrics
from chatstream_asgi.service.parsing import ChatRequest, InvalidRequest, apply_params, parse_chat_request
from chatstream_asgi.service.prompts import Turn, commit_turn, fit_to_budget, new_message, plain, start_turn
from chatstream_asgi.sessions.manager import OpenSession, Session, SessionManager, SessionStore, StoredMessage
from chatstream_asgi.states import CompletionState

if TYPE_CHECKING:
    from chatstream_asgi.asgi.sendloop import Receive, Send
    from chatstream_asgi.protocols.chat_api import FeedbackCallback

__all__ = ["Callback", "ChatResult", "ChatStream", "ChatStreamResponse", "get_result"]

logger = logging.getLogger("chatstream_asgi")

Callback = Callable[[Request, CompletionState], Awaitable[None] | None]
"""``callback(request, state)``, sync or async, called once when a reply ends."""

RESULT_KEY = "chatstream"
SHARED_RECEIVE_KEY = "chatstream_asgi.receive"
_REQUEST_ID = re.compile(r"^[\w.:@/+=-]{1,128}$")

SAVED_STATES = frozenset({CompletionState.SUCCESS, CompletionState.CLIENT_DISCONNECTED_WHILE_STREAMING})
"""The states whose turn is saved to the session history (a partial reply when the client left)."""


@dataclass
class ChatResult:
    """What a completion callback can read, as ``request.state.chatstream`` or via :func:`get_result`,
    in middleware and endpoint mode alike.

    As in the original library's example, a callback can print the conversation's prompt::

        def callback(request, state):
            result = get_result(request)
            print(state, result.prompt + result.reply)
            print(result.session.messages)  # the saved history, this reply included
    """

    request_id: str
    message_id: str
    """The reply's id, as sent in ``X-ChatStream-Last-Generated-Message-Id``."""
    messages: list[Message]
    """The conversation the reply was generated for (system prompt and history included)."""
    prompt: str = ""
    """The prompt text the model was given: ``messages`` through the chat template."""
    reply: str = ""
    """The reply text that was sent (partial when the client left mid-stream)."""
    state: CompletionState | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    """Of ``prompt_tokens``, those the engine reused from its prefix cache instead of computing them."""
    session_id: str | None = None
    """The session of a ``user_input`` request; None for stateless (``messages``) requests."""
    session: Session | None = field(default=None, repr=False)
    """The session: as loaded when the request came, and as saved (this turn included) once
    the reply ended in ``success`` or ``client_disconnected_while_streaming``."""
    turn: Turn | None = field(default=None, repr=False)
    """The user message this reply answers and the history before it (session requests)."""
    chat_request: ChatRequest | None = field(default=None, repr=False)


def get_result(request_or_scope: Request | MutableMapping[str, Any]) -> ChatResult | None:
    """The :class:`ChatResult` of a chat request (``None`` before it was accepted)."""
    scope = request_or_scope.scope if isinstance(request_or_scope, Request) else request_or_scope
    return scope.get("state", {}).get(RESULT_KEY)


class _RequestLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        request_id = self.extra["request_id"] if self.extra else "-"
        kwargs.setdefault("extra", {})["request_id"] = request_id
        return f"[{request_id}] {msg}", kwargs


class ChatStream:
    """A load-controlled streaming chat service over one shared engine.

    ``num_of_concurrent_executions`` replies generate at once and ``max_queue_size`` wait in
    FIFO order; beyond that a request gets ``{"error": "too_many_requests"}`` at once (429, or
    200 when ``too_many_request_as_http_error`` is False, as in the original library).

    Serve it with :class:`~chatstream_asgi.ChatStreamMiddleware`, or call
    :meth:`handle_chat_stream_request` from an endpoint.

    Sessions keep each client's history: ``session_secret`` signs their tokens (set it, the same
    on every replica; without it a random per-process secret is used and a warning logged),
    ``session_store`` keeps them (a :class:`~chatstream_asgi.sessions.MemorySessionStore` by
    default; :class:`~chatstream_asgi.redis_store.RedisSessionStore` shares them between
    replicas), ``session_cookie_secure`` marks the cookie ``Secure``. ``feedback_callback``
    ``(request, message_id, feedback)`` hears likes and dislikes sent to ``/set_feedback``.
    """

    def __init__(
        self,
        engine: Engine | None = None,
        *,
        num_of_concurrent_executions: int = 2,
        max_queue_size: int = 5,
        too_many_request_as_http_error: bool = True,
        max_new_tokens: int = 256,
        stream_format: str = "text",
        temperature: float = 0.7,
        top_k: int = 50,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        system_prompt: str | None = None,
        callback: Callback | None = None,
        feedback_callback: FeedbackCallback | None = None,
        session_secret: str | bytes | None = None,
        session_store: SessionStore | None = None,
        session_cookie: str = "chatstream_session",
        session_cookie_secure: bool = False,
        send_timeout: float = 30.0,
        shutdown_timeout: float = 10.0,
        use_mock_response: bool = False,
        mock_params: Mapping[str, Any] | None = None,
        metrics_registry: CollectorRegistry | None = None,
    ) -> None:
        if engine is None:
            if not use_mock_response:
                raise TypeError("ChatStream needs an engine (or use_mock_response=True)")
            engine = MockEngine(MockParams(**(mock_params or {})))
        if stream_format not in FORMATS:
            raise ValueError(f"stream_format must be one of {sorted(FORMATS)}")
        self.engine = engine
        self.admission = Admission(num_of_concurrent_executions, max_queue_size)
        self.too_many_request_as_http_error = too_many_request_as_http_error
        self.max_new_tokens = max_new_tokens
        self.stream_format = stream_format
        self.default_params = GenerationParams(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            max_new_tokens=max_new_tokens,
        )
        self.system_prompt = system_prompt
        self.callback = callback
        self.feedback_callback = feedback_callback
        self.sessions = SessionManager(
            session_store, session_secret, cookie_name=session_cookie, cookie_secure=session_cookie_secure
        )
        self.send_timeout = send_timeout
        self.shutdown_timeout = shutdown_timeout
        self.metrics = Metrics(metrics_registry)
        self.metrics.observe_admission(self.admission)
        self.metrics.observe_engine(engine)
        self._formats = frozenset(FORMATS)
        self._replies: set[Reply] = set()
        self._started = False
        self._closing = False

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def closing(self) -> bool:
        """Whether :meth:`shutdown` began: new requests get 503."""
        return self._closing

    async def start(self) -> None:
        """Start the engine (idempotent). Called on lifespan startup or on first request."""
        if not self._started:
            self._started = True
            await self.engine.start()

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop admitting, let open replies finish for ``timeout`` seconds, abort the rest.

        Aborted replies end with a ``server_shutting_down`` error frame (``unknown_error_occurred``).
        Idempotent: a second call (the lifespan shutdown after a signal handler's) returns at once.
        """
        if self._closing:
            return
        self._closing = True
        with anyio.move_on_after(self.shutdown_timeout if timeout is None else timeout):
            await self.admission.wait_idle()
        for reply in list(self._replies):
            reply.abort("the server is shutting down")
        with anyio.move_on_after(self.send_timeout):
            await self.admission.wait_idle()
        await self.engine.shutdown()

    # -- endpoint mode ------------------------------------------------------------------

    async def handle_chat_stream_request(
        self,
        request: Request,
        request_body: bytes | str | Mapping[str, Any] | None = None,
        callback: Callback | None = None,
    ) -> ChatStreamResponse:
        """A response that serves this chat request; return it from a Starlette/FastAPI endpoint.

        ``request_body`` is the body the endpoint already read (raw or parsed JSON); without it
        the body is read from ``request`` (which works twice under :class:`ChatStreamMiddleware`).
        ``callback`` overrides the ChatStream's callback.
        """
        return ChatStreamResponse(self, request, request_body, callback)

    # -- ASGI-level services -------------------------------------------------------------

    async def serve_chat(
        self,
        scope: MutableMapping[str, Any],
        receive: Receive,
        send: Send,
        body: bytes | str | Mapping[str, Any],
        *,
        request: Request | None = None,
        callback: Callback | None = None,
    ) -> CompletionState | None:
        """Serve one chat request whose body has been read; None when it was rejected.

        A ``user_input`` request continues the session of its cookie or ``X-Session-Id`` header
        (a fresh session when missing, tampered or expired); the response carries the session
        token in ``X-Session-Id`` (and ``Set-Cookie`` for a new session). A ``messages``
        request is stateless and leaves the session alone.
        """
        started_at = time.monotonic()
        log = self.request_log(scope)
        headers = self._id_headers(log)
        if self._closing:
            await send_json(send, 503, {"error": "server_shutting_down"}, headers)
            return None
        try:
            chat_request = parse_chat_request(body, formats=self._formats)
        except InvalidRequest as exc:
            return await self.reject(send, 400, "invalid_request", exc.detail, headers, log)
        opened = None
        if chat_request.messages is None:
            try:
                opened = await self.sessions.open(scope)
            except Exception:  # the session store failed (an unreachable Redis, say)
                log.exception("loading the session failed")
                await send_json(send, 503, {"error": "session_store_unavailable"}, headers)
                return None
            headers += self.sessions.headers(opened)
        try:
            result, params = self._prepare(log, chat_request, opened)
        except InvalidRequest as exc:
            return await self.reject(send, 400, "invalid_request", exc.detail, headers, log)
        framer = FORMATS[chat_request.format or self.stream_format]()
        queue_full = (429 if self.too_many_request_as_http_error else 200, {"error": "too_many_requests"})
        return await self.stream_reply(
            scope,
            receive,
            send,
            result,
            params,
            framer,
            headers=headers,
            log=log,
            started_at=started_at,
            request=request,
            callback=callback,
            queue_full=queue_full,
        )

    async def stream_reply(
        self,
        scope: MutableMapping[str, Any],
        receive: Receive,
        send: Send,
        result: ChatResult,
        params: GenerationParams,
        framer: Framer,
        *,
        headers: list[tuple[bytes, bytes]],
        log: logging.LoggerAdapter[logging.Logger],
        started_at: float,
        request: Request | None,
        callback: Callback | None,
        queue_full: tuple[int, Mapping[str, Any]],
    ) -> CompletionState | None:
        """Admit a prepared chat and stream its reply with ``framer``; None when the queue was full.

        The chat and the OpenAI-compatible endpoints share this: admission, the send loop, the
        completion state, history saving, metrics and the callback. ``queue_full`` is the status
        and JSON body of the queue-full rejection.
        """
        await self.start()
        try:
            ticket = self.admission.enter()
        except QueueFull:
            wait = self.admission.estimated_wait(self.admission.waiting + 1)
            retry_after = [(b"retry-after", str(max(1, round(wait))).encode())] if wait is not None else []
            status, body = queue_full
            log.info("rejected: queue full")
            self.metrics.rejected.labels(reason="queue_full").inc()
            await send_json(send, status, body, [*headers, *retry_after])
            return None

        scope.setdefault("state", {})[RESULT_KEY] = result
        reply = Reply(
            engine=self.engine,
            request=GenerationRequest(result.request_id, result.messages, params, session_key=result.session_id),
            message_id=result.message_id,
            ticket=ticket,
            framer=framer,
            headers=[
                (b"content-type", framer.media_type.encode()),
                (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no"),
                (b"x-chatstream-last-generated-message-id", result.message_id.encode()),
                *headers,
            ],
            metrics=self.metrics,
            logger=log,
            send_timeout=self.send_timeout,
            started_at=started_at,
        )
        log.info("accepted (position %d in queue)", ticket.position)
        self._replies.add(reply)
        try:
            await reply.run(scope.get(SHARED_RECEIVE_KEY, receive), send)
        except anyio.get_cancelled_exc_class():
            reply.mark_disconnected()  # the server dropped the request task: its client left
            raise
        finally:
            self._replies.discard(reply)
            with anyio.CancelScope(shield=True):
                await self._complete(scope, reply, result, request, callback, log)
        return reply.state

    async def report_early_disconnect(
        self,
        scope: MutableMapping[str, Any],
        *,
        request: Request | None = None,
        callback: Callback | None = None,
    ) -> CompletionState:
        """Record a client that left while still sending its request body."""
        state = CompletionState.CLIENT_DISCONNECTED_BEFORE_STREAMING
        log = self.request_log(scope)
        log.info("client disconnected while sending the body")
        self.metrics.completions.labels(state=state.value).inc()
        await self._call_callback(scope, request, callback, state, log)
        return state

    def get_load(self) -> dict[str, Any]:
        """Slots in use and queue length, with the wait a new request would see."""
        admission = self.admission
        return {
            "processing": admission.active,
            "waiting": admission.waiting,
            "max_processing": admission.max_active,
            "max_waiting": admission.max_waiting,
            "estimated_wait_seconds": admission.estimated_wait(admission.waiting + 1)
            if admission.active >= admission.max_active
            else 0.0,
        }

    # -- conversation ---------------------------------------------------------------------

    def system_messages(self) -> list[Message]:
        """The configured system prompt as a message list (empty without one)."""
        return [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []

    def history_prompt(self, history: list[StoredMessage]) -> str:
        """The prompt text a session's history renders to, as the next reply would continue it."""
        budget = self.engine.context_len - self.default_params.max_new_tokens
        return self.engine.render_prompt(
            fit_to_budget(self.engine.count_tokens, self.system_messages(), history, [], budget)
        )

    def _prepare(
        self, log: logging.LoggerAdapter[logging.Logger], chat_request: ChatRequest, opened: OpenSession | None
    ) -> tuple[ChatResult, GenerationParams]:
        """The conversation to generate a reply for and its parameters (session defaults first)."""
        overrides = chat_request.generation_params
        if opened is not None:
            overrides = {**opened.session.generation_params, **overrides}
        params = apply_params(self.default_params, overrides, max_new_tokens=self.max_new_tokens)
        budget = self.engine.context_len - params.max_new_tokens
        turn = None
        if opened is None:
            assert chat_request.messages is not None
            messages = chat_request.messages
            system = [] if messages[0]["role"] == "system" else self.system_messages()
            messages = fit_to_budget(self.engine.count_tokens, system, [], messages, budget)
        else:
            turn = start_turn(opened.session.messages, chat_request.user_input, regenerate=chat_request.regenerate)
            messages = fit_to_budget(
                self.engine.count_tokens, self.system_messages(), turn.history, plain([turn.user]), budget
            )
        result = ChatResult(
            request_id=log.extra["request_id"],  # type: ignore[index]
            message_id=uuid.uuid4().hex,
            messages=messages,
            prompt=self.engine.render_prompt(messages),
            session_id=opened.session.id if opened else None,
            session=opened.session if opened else None,
            turn=turn,
            chat_request=chat_request,
        )
        return result, params

    async def _save_turn(self, result: ChatResult, log: logging.LoggerAdapter[logging.Logger]) -> None:
        assert result.session_id is not None and result.turn is not None
        store = self.sessions.store
        try:
            session = await store.load(result.session_id) or Session(result.session_id)
            reply = new_message("assistant", result.reply, result.message_id)
            session.messages = commit_turn(session.messages, result.turn, reply)
            await store.save(session)
        except Exception:
            log.exception("saving the conversation failed")
            return
        result.session = session

    # -- helpers ----------------------------------------------------------------------------

    def request_log(self, scope: MutableMapping[str, Any]) -> logging.LoggerAdapter[logging.Logger]:
        """A logger that prefixes the request id (the client's ``X-Request-Id`` when well-formed)."""
        request_id = None
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                if _REQUEST_ID.match(candidate):
                    request_id = candidate
                break
        return _RequestLog(logger, {"request_id": request_id or uuid.uuid4().hex[:16]})

    @staticmethod
    def _id_headers(log: logging.LoggerAdapter[logging.Logger]) -> list[tuple[bytes, bytes]]:
        return [(b"x-request-id", log.extra["request_id"].encode())]  # type: ignore[index]

    async def reject(
        self,
        send: Send,
        status: int,
        reason: str,
        detail: str,
        headers: list[tuple[bytes, bytes]],
        log: logging.LoggerAdapter[logging.Logger],
        body: Mapping[str, Any] | None = None,
    ) -> None:
        """Turn a request away before admission (counted under ``reason``); ``body`` defaults to
        ``{"error": reason, "detail": detail}``."""
        log.info("rejected: %s (%s)", reason, detail)
        self.metrics.rejected.labels(reason=reason).inc()
        await send_json(send, status, body if body is not None else {"error": reason, "detail": detail}, headers)

    async def _complete(
        self,
        scope: MutableMapping[str, Any],
        reply: Reply,
        result: ChatResult,
        request: Request | None,
        callback: Callback | None,
        log: logging.LoggerAdapter[logging.Logger],
    ) -> None:
        state = reply.state
        result.state = state
        result.reply = reply.text
        if reply.stream is not None:
            result.finish_reason = reply.stream.finish_reason
            result.prompt_tokens = reply.stream.prompt_tokens
            result.completion_tokens = reply.stream.completion_tokens
            result.cached_tokens = reply.stream.cached_tokens
        self.metrics.completions.labels(state=state.value).inc()
        log.info(
            "completed: %s (%d tokens), %d of %d prompt tokens reused",
            state.value,
            result.completion_tokens,
            result.cached_tokens,
            result.prompt_tokens,
        )
        if result.turn is not None and state in SAVED_STATES:
            await self._save_turn(result, log)
        await self._call_callback(scope, request, callback, state, log)

    async def _call_callback(
        self,
        scope: MutableMapping[str, Any],
        request: Request | None,
        callback: Callback | None,
        state: CompletionState,
        log: logging.LoggerAdapter[logging.Logger],
    ) -> None:
        callback = callback or self.callback
        if callback is None:
            return
        try:
            outcome = callback(request if request is not None else Request(scope), state)
            if inspect.isawaitable(outcome):
                await outcome
        except Exception:
            log.exception("completion callback failed")


class ChatStreamResponse(Response):
    """The response :meth:`ChatStream.handle_chat_stream_request` returns.

    Starlette and FastAPI call it as an ASGI app; it reads the body if needed, then streams.
    """

    def __init__(
        self,
        chat_stream: ChatStream,
        request: Request,
        request_body: bytes | str | Mapping[str, Any] | None,
        callback: Callback | None,
    ) -> None:
        super().__init__(status_code=200, media_type=FORMATS[chat_stream.stream_format].media_type)
        self.chat_stream = chat_stream
        self.request = request
        self.request_body = request_body
        self.callback = callback

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        cs = self.chat_stream
        body = self.request_body
        if body is None:
            try:
                body = await self.request.body()
            except ClientDisconnect:
                await cs.report_early_disconnect(scope, request=self.request, callback=self.callback)
                return
        await cs.serve_chat(scope, receive, send, body, request=self.request, callback=self.callback)
