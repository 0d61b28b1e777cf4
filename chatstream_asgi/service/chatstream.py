"""``ChatStream``: the front door, a thin facade over the service's collaborators.

Configuration and lifecycle live here; the work is done by :class:`ChatPreparer` (body to
prepared chat), :class:`Replies` (admission and the send loop), :class:`Outcomes` (how requests
end) and :class:`PromptBuilder` (fitting conversations into the context).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import anyio
from prometheus_client import CollectorRegistry

from chatstream_asgi.asgi.endpoint import ChatStreamResponse
from chatstream_asgi.asgi.responses import send_json
from chatstream_asgi.engines.base import Engine, GenerationParams
from chatstream_asgi.engines.mock import MockEngine, MockParams
from chatstream_asgi.logs import DEFAULT_REQUEST_ID_HEADER, current_request_id, logger
from chatstream_asgi.protocols.framing import FORMATS
from chatstream_asgi.protocols.openai import error_body
from chatstream_asgi.service import heap
from chatstream_asgi.service.admission import Admission
from chatstream_asgi.service.metrics import Metrics
from chatstream_asgi.service.outcomes import Outcomes, Rejection
from chatstream_asgi.service.preparation import ChatPreparer
from chatstream_asgi.service.prompts import PromptBuilder
from chatstream_asgi.service.replies import PreparedChat, Replies
from chatstream_asgi.service.tenant_metrics import TenantMetrics
from chatstream_asgi.service.tenants import Fairness, TenantSource
from chatstream_asgi.sessions.manager import SessionManager
from chatstream_asgi.sessions.store import SessionStore, StoredMessage
from chatstream_asgi.states import CompletionState
from chatstream_asgi.types import Callback, FeedbackCallback, Headers, Receive, Scope, Send

if TYPE_CHECKING:
    from starlette.requests import Request

__all__ = ["ChatStream"]


class ChatStream:
    """A load-controlled streaming chat service over one shared engine.

    ``num_of_concurrent_executions`` replies generate at once and ``max_queue_size`` wait in
    FIFO order; beyond that a request gets ``{"error": "too_many_requests"}`` at once (429, or
    200 when ``too_many_request_as_http_error`` is False, as in the original library).

    Serve it with :class:`~chatstream_asgi.ChatStreamMiddleware`, or call
    :meth:`handle_chat_stream_request` from an endpoint.

    Sessions keep each client's history: ``session_secret`` signs their tokens (set it, the same
    on every replica; without it a random per-process secret is used and a warning logged),
    ``session_store`` keeps them (a :class:`~chatstream_asgi.MemorySessionStore` by default;
    :class:`~chatstream_asgi.RedisSessionStore` shares them between replicas),
    ``session_cookie_secure`` marks the cookie ``Secure``. ``feedback_callback``
    ``(request, message_id, feedback)`` hears likes and dislikes sent to ``/set_feedback``.
    Each request is logged and answered under the id in its ``request_id_header`` (a fresh id
    when absent or malformed); ``echo_request_id=False`` leaves the header out of the reply, for a
    proxy in front that sets it itself (Ray Serve's does).

    ``temperature``, ``top_k``, ``top_p`` and ``repetition_penalty`` left at ``None`` come from the
    engine's ``default_generation_params`` (the model's own, e.g. its generation config) where it has
    them, else 0.7, 50, 1.0 and 1.0.

    ``request_timeout`` (seconds, off by default) is a deadline on each reply, queue wait
    included: a reply still running then (a stalled engine) ends ``unknown_error_occurred`` with
    a ``deadline_exceeded`` error frame, or a 504 JSON error if nothing was sent yet.

    Tenants (``docs/fairness.md``): ``tenant`` names where a request's tenant key comes from
    (``"header:X-API-Key"``, ``"bearer"``, ``"user"``, ``"state:KEY"``, ``"session"`` or a callable of the
    scope; default: one tenant); slots then go to the tenant served the fewest tokens, and
    ``fairness`` (:class:`~chatstream_asgi.service.tenants.Fairness`) sets per-tenant caps and priorities.

    Limits: ``max_body_size`` bytes of request body in endpoint mode (the middleware has its
    own), ``max_history_messages`` kept per session (the oldest turns go first), and while a
    request waits in the queue its queue event (an SSE comment for the OpenAI API) is repeated
    every ``keepalive_interval`` seconds, so proxies do not close an idle stream.
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
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        system_prompt: str | None = None,
        callback: Callback | None = None,
        feedback_callback: FeedbackCallback | None = None,
        session_secret: str | bytes | None = None,
        session_store: SessionStore | None = None,
        session_cookie: str = "chatstream_session",
        session_cookie_secure: bool = False,
        send_timeout: float = 30.0,
        request_timeout: float | None = None,
        shutdown_timeout: float = 10.0,
        keepalive_interval: float = 15.0,
        max_body_size: int = 1 << 20,
        max_history_messages: int = 200,
        request_id_header: str = DEFAULT_REQUEST_ID_HEADER,
        echo_request_id: bool = True,
        use_mock_response: bool = False,
        mock_params: Mapping[str, Any] | None = None,
        metrics_registry: CollectorRegistry | None = None,
        tenant: TenantSource | None = None,
        fairness: Fairness | None = None,
    ) -> None:
        if engine is None:
            if not use_mock_response:
                raise TypeError("ChatStream needs an engine (or use_mock_response=True)")
            engine = MockEngine(MockParams(**(mock_params or {})))
        if stream_format not in FORMATS:
            raise ValueError(f"stream_format must be one of {sorted(FORMATS)}")
        self.engine = engine
        self.max_new_tokens = max_new_tokens
        self.stream_format = stream_format
        # Sampling not given here: the engine's model-suited defaults where it has them, else GenerationParams'.
        suited = getattr(engine, "default_generation_params", None) or {}
        given = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "repetition_penalty": repetition_penalty}
        sampling = {key: suited.get(key) if value is None else value for key, value in given.items()}
        self.default_params = GenerationParams(
            max_new_tokens=max_new_tokens, **{key: value for key, value in sampling.items() if value is not None}
        )
        self.feedback_callback = feedback_callback
        self.shutdown_timeout = shutdown_timeout
        self.send_timeout = send_timeout
        self.max_body_size = max_body_size
        self.request_id_header = request_id_header
        self.echo_request_id = echo_request_id
        fairness = fairness or Fairness()
        self.fairness = fairness = fairness if tenant is None else replace(fairness, tenant=tenant)
        self.metrics = Metrics(metrics_registry)
        self.admission = Admission(
            num_of_concurrent_executions,
            max_queue_size,
            tenant_max_active=fairness.tenant_max_active,
            tenant_max_queued=fairness.tenant_max_queued,
            priority_step=fairness.priority_step,
        )
        self.admission.observer = TenantMetrics(
            self.metrics.registry, fairness.metrics_tenants, self.admission.tenant_load, self.admission.totals
        )
        self.metrics.observe_admission(self.admission)
        self.metrics.observe_engine(engine)
        self.sessions = SessionManager(
            session_store, session_secret, cookie_name=session_cookie, cookie_secure=session_cookie_secure
        )
        self.prompts = PromptBuilder(engine, system_prompt)
        self.outcomes = Outcomes(self.metrics, self.sessions, callback, max_history_messages=max_history_messages)
        if request_timeout is not None and request_timeout <= 0:
            raise ValueError("request_timeout must be positive (or None for no deadline)")
        self.replies = Replies(
            engine,
            self.admission,
            self.metrics,
            self.outcomes,
            send_timeout,
            request_timeout=request_timeout,
            keepalive_interval=keepalive_interval,
            fairness=fairness,
        )
        self.preparer = ChatPreparer(
            self.sessions,
            self.prompts,
            self.default_params,
            max_new_tokens,
            stream_format,
            queue_full_status=429 if too_many_request_as_http_error else 200,
        )
        self._started = False
        self._starting: asyncio.Future[None] | None = None
        self._frozen = False
        self._closing = False

    @property
    def callback(self) -> Callback | None:
        """The completion callback of requests that bring none of their own."""
        return self.outcomes.callback

    @callback.setter
    def callback(self, callback: Callback | None) -> None:
        self.outcomes.callback = callback

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def closing(self) -> bool:
        """Whether :meth:`shutdown` began: new requests get 503."""
        return self._closing

    async def start(self) -> None:
        """Start the engine (idempotent). Called on lifespan startup or on first request.

        Concurrent callers (the first requests, when the server runs no lifespan) all wait for the
        one start, and a caller cancelled meanwhile (its client left) does not cancel it. If the
        start fails, its callers get the error and the next call tries again.

        The heap it leaves is then frozen out of the garbage collector's full passes (:mod:`.heap`),
        which would otherwise stall every stream for a walk over the start-up objects. Freezing first
        collects once, on the event loop (about 0.1-0.3 s with a model loaded): on the first request
        when the server runs no lifespan.
        """
        if self._started:
            return
        if self._starting is None:
            self._starting = asyncio.ensure_future(self._start_engine())
            self._starting.add_done_callback(self._start_ended)
        await asyncio.shield(self._starting)

    async def _start_engine(self) -> None:
        await self.engine.start()
        self._started = True
        if not self._closing:  # a shutdown that ran meanwhile would owe a thaw it never gives
            heap.freeze()
            self._frozen = True

    def _start_ended(self, starting: asyncio.Future[None]) -> None:
        """After a failed start, the next call starts again (the error is its callers' to report)."""
        self._starting = None
        if not starting.cancelled() and starting.exception() is not None:
            logger.error("starting the engine failed", exc_info=starting.exception())

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop admitting, let open replies finish for ``timeout`` seconds, abort the rest.

        An engine start under way (a first request's, with no lifespan) is let end first, within the same
        ``timeout``: an engine stopped under its start could run on once the start ends, but a start that
        never ends must not hold the shutdown.

        Aborted replies end with a ``server_shutting_down`` error frame (``unknown_error_occurred``).
        Idempotent: a second call (the lifespan shutdown after a signal handler's) returns at once.
        """
        if self._closing:
            return
        self._closing = True
        try:
            with anyio.move_on_after(self.shutdown_timeout if timeout is None else timeout):
                if self._starting is not None:
                    with contextlib.suppress(Exception):  # a failed start is its callers' to report
                        await asyncio.shield(self._starting)
                await self.admission.wait_idle()
            self.stop_now()
            with anyio.move_on_after(self.send_timeout):
                await self.admission.wait_idle()
            await self.engine.shutdown()
        finally:  # also when the engine fails to stop or this is cancelled: no second call would thaw
            if self._frozen:
                self._frozen = False
                heap.thaw()

    def stop_now(self) -> None:
        """End every open reply now with a ``server_shutting_down`` error frame (the drain cut short:
        a second Ctrl+C); :meth:`shutdown` does the same when its timeout runs out."""
        self.replies.abort_all("the server is shutting down")

    # -- serving ------------------------------------------------------------------------

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

    async def serve_chat(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        body: bytes | str | Mapping[str, Any],
        *,
        request: Request,
        callback: Callback | None = None,
    ) -> CompletionState | None:
        """Serve one ``/chat_stream`` request whose body has been read; None when it was rejected.

        The response carries the session token in ``X-Session-Id`` (and ``Set-Cookie`` for a new
        session); ``request`` is what the callback is called with.
        """
        headers = self.id_headers()
        if self._closing:
            await send_json(
                send, 503, {"error": "server_shutting_down", "detail": "the server is shutting down"}, headers
            )
            return None
        try:
            async with self.outcomes.reports_cancellation(request, callback):  # the session may be loading
                chat = await self.preparer.prepare(scope, body, headers, request=request, callback=callback)
        except Rejection as rejection:
            await self.outcomes.reject(send, rejection, headers)
            return None
        return await self.stream(scope, receive, send, chat)

    async def stream(self, scope: Scope, receive: Receive, send: Send, chat: PreparedChat) -> CompletionState | None:
        """Admit a prepared chat (from any protocol) and stream its reply; None when the queue was full."""
        try:
            async with self.outcomes.reports_cancellation(chat.request, chat.callback):
                await self.start()
        except Exception:  # logged by the start; the next request starts again
            await self.outcomes.failed_to_start(chat.result, chat.request, chat.callback)
            error = CompletionState.UNKNOWN_ERROR_OCCURRED.value
            body = chat.framer.error_json(error, "the engine failed to start")
            with contextlib.suppress(OSError):  # the client may have left meanwhile
                await send_json(send, 500, body, [(k, v) for k, v in chat.headers if k.startswith(b"x-")])
            return CompletionState.UNKNOWN_ERROR_OCCURRED
        return await self.replies.stream(scope, receive, send, chat)

    async def reject_body_too_large(self, send: Send, limit: int, *, openai: bool = False) -> None:
        """Answer 413 for a body over ``limit`` bytes (in OpenAI's error shape for ``openai``) and count it."""
        detail = f"the request body is larger than {limit} bytes"
        body = error_body(detail, "invalid_request_error", "body_too_large") if openai else None
        headers = [*self.id_headers(), (b"connection", b"close")]
        await self.outcomes.reject(send, Rejection(413, "body_too_large", detail, body), headers)

    async def report_early_disconnect(self, request: Request, callback: Callback | None = None) -> CompletionState:
        """Record a client that left while still sending its request body."""
        return await self.outcomes.left_early(request, callback)

    def reports_cancellation(self, request: Request, callback: Callback | None) -> AbstractAsyncContextManager[None]:
        """Wrap a wait before admission: a cancellation there is reported as a client that left, then re-raised."""
        return self.outcomes.reports_cancellation(request, callback)

    def id_headers(self) -> Headers:
        """The response header that echoes the current request's id."""
        if not self.echo_request_id:
            return []
        return [(self.request_id_header.lower().encode("latin-1"), (current_request_id() or "-").encode())]

    # -- reading --------------------------------------------------------------------------

    def get_load(self, scope: Scope | None = None) -> dict[str, Any]:
        """Slots in use and queue length, with the wait a new request (of the tenant ``scope`` names) would
        see, and the tokens generated so far (open replies included, so that two readings a second apart
        give the current tokens/s). With tenants on, ``tenant`` gives the caller's own share."""
        admission = self.admission
        claim = self.fairness.claim(
            scope, session_id=None, body_priority=0, prompt_tokens=0, max_new_tokens=self.max_new_tokens
        )
        load = {
            "processing": admission.active,
            "waiting": admission.waiting,
            "max_processing": admission.max_active,
            "max_waiting": admission.max_waiting,
            "estimated_wait_seconds": admission.estimate_new(claim),
            "generated_tokens": self.replies.generated_tokens,
        }
        if self.fairness.tenants_on:
            load["tenant"] = admission.tenant_report(claim.tenant)
        return load

    def history_prompt(self, history: list[StoredMessage]) -> str:
        """The prompt text a session's history renders to, as the next reply would continue it."""
        return self.prompts.history_prompt(history, self.default_params.max_new_tokens)
