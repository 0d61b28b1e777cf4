"""``ChatStream``: the front door, a thin facade over the service's collaborators.

Configuration (:class:`~chatstream_asgi.service.config.ChatStreamConfig`) and the lifecycle live
here, and endpoint mode (:meth:`ChatStream.handle_chat_stream_request`, whose response is a Starlette
``Response``); the work is done by :class:`ChatPreparer` (body to prepared chat), :class:`Replies`
(admission and the send loop), :class:`Outcomes` (how requests end) and :class:`PromptBuilder`
(fitting conversations into the context).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict
from typing import Any

import anyio
from prometheus_client import CollectorRegistry
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from chatstream_asgi.asgi.replay import BodyTooLarge, read_request_body, watched_receive
from chatstream_asgi.asgi.request_id import request_id_scope
from chatstream_asgi.asgi.responses import send_json
from chatstream_asgi.engines.base import Engine, GenerationParams
from chatstream_asgi.engines.mock import MockEngine, MockParams
from chatstream_asgi.logs import logger
from chatstream_asgi.protocols.dialect import ChatDialect, Dialect
from chatstream_asgi.protocols.framing import FORMATS
from chatstream_asgi.service import heap
from chatstream_asgi.service.admission import Admission
from chatstream_asgi.service.config import ChatStreamConfig, Sampling
from chatstream_asgi.service.exchange import Exchange
from chatstream_asgi.service.metrics import Metrics
from chatstream_asgi.service.outcomes import Outcomes, Rejection
from chatstream_asgi.service.preparation import ChatPreparer
from chatstream_asgi.service.prompts import PromptBuilder
from chatstream_asgi.service.replies import PreparedChat, Replies
from chatstream_asgi.service.tenant_metrics import TenantMetrics
from chatstream_asgi.service.tenants import TenantSource
from chatstream_asgi.sessions.manager import SessionManager
from chatstream_asgi.sessions.store import SessionStore, StoredMessage
from chatstream_asgi.states import CompletionState
from chatstream_asgi.types import Callback, FeedbackCallback, Receive, Scope, Send

__all__ = ["ChatStream", "ChatStreamResponse"]


class ChatStream:
    """A load-controlled streaming chat service over one shared engine.

    ``num_of_concurrent_executions`` replies generate at once and ``max_queue_size`` wait in
    FIFO order; beyond that a request gets ``{"error": "too_many_requests"}`` at once (429, or
    200 when ``too_many_request_as_http_error`` is False, as in the original library).

    Serve it with :class:`~chatstream_asgi.ChatStreamMiddleware`, or call
    :meth:`handle_chat_stream_request` from an endpoint.

    Tenants (``docs/fairness.md``): ``tenant`` names where a request's tenant key comes from
    (``"header:X-API-Key"``, ``"bearer"``, ``"user"``, ``"state:KEY"``, ``"session"`` or a callable of the
    scope; default: one tenant); slots then go to the tenant served the fewest tokens, and the
    :class:`~chatstream_asgi.Fairness` group sets per-tenant caps and priorities.

    Settings come as a :class:`~chatstream_asgi.ChatStreamConfig` (``config``) and/or by their flat
    keyword names (``num_of_concurrent_executions=4``, ``temperature=0.3``, ``session_secret=...``:
    every field of the config's groups), which win over ``config``. The objects stay arguments:
    ``callback(request, state)`` hears how each request ended; ``feedback_callback(request,
    message_id, feedback)`` hears likes and dislikes sent to ``/set_feedback``; ``session_store``
    keeps the sessions (a :class:`~chatstream_asgi.MemorySessionStore` by default;
    :class:`~chatstream_asgi.RedisSessionStore` shares them between replicas); ``metrics_registry``
    is where the metrics go (their own registry by default). ``use_mock_response=True`` without an
    engine serves a :class:`~chatstream_asgi.MockEngine` with ``mock_params``, as the original did.
    """

    def __init__(
        self,
        engine: Engine | None = None,
        config: ChatStreamConfig | None = None,
        *,
        callback: Callback | None = None,
        feedback_callback: FeedbackCallback | None = None,
        session_store: SessionStore | None = None,
        metrics_registry: CollectorRegistry | None = None,
        use_mock_response: bool = False,
        mock_params: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> None:
        config = (config or ChatStreamConfig()).with_options(**options)
        if engine is None:
            if not use_mock_response:
                raise TypeError("ChatStream needs an engine (or use_mock_response=True)")
            engine = MockEngine(MockParams(**(mock_params or {})))
        self.engine = engine
        self.config = config
        limits, timeouts, sessions = config.limits, config.timeouts, config.sessions
        self.default_params = default_params(engine, config.sampling, limits.max_new_tokens)
        self.chat_dialect = ChatDialect(queue_full_status=429 if limits.too_many_request_as_http_error else 200)
        """The error bodies of ``/chat_stream`` and the extra APIs."""
        self.feedback_callback = feedback_callback
        fairness = config.fairness
        self.admission = Admission(
            limits.num_of_concurrent_executions,
            limits.max_queue_size,
            tenant_max_active=fairness.tenant_max_active,
            tenant_max_queued=fairness.tenant_max_queued,
            priority_step=fairness.priority_step,
        )
        self.metrics = Metrics(metrics_registry)
        self.admission.observer = TenantMetrics(
            self.metrics.registry, fairness.metrics_tenants, self.admission.tenant_load, self.admission.totals
        )
        self.metrics.observe_admission(self.admission)
        self.metrics.observe_engine(engine)
        self.sessions = SessionManager(
            session_store,
            sessions.session_secret,
            cookie_name=sessions.session_cookie,
            cookie_secure=sessions.session_cookie_secure,
        )
        self.prompts = PromptBuilder(engine, config.system_prompt)
        self.outcomes = Outcomes(
            self.metrics, self.sessions, callback, max_history_messages=limits.max_history_messages
        )
        self.replies = Replies(
            engine,
            self.start,
            self.admission,
            self.metrics,
            self.outcomes,
            timeouts.send_timeout,
            request_timeout=timeouts.request_timeout,
            keepalive_interval=timeouts.keepalive_interval,
            fairness=fairness,
            prepare=self.prompts.prepare_request,
        )
        self.preparer = ChatPreparer(
            self.sessions, self.prompts, self.default_params, limits.max_new_tokens, config.stream_format
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
            with anyio.move_on_after(self.config.timeouts.shutdown_timeout if timeout is None else timeout):
                if self._starting is not None:
                    with contextlib.suppress(Exception):  # a failed start is its callers' to report
                        await asyncio.shield(self._starting)
                await self.admission.wait_idle()
            self.stop_now()
            with anyio.move_on_after(self.config.timeouts.send_timeout):
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

    async def body_too_large(self, send: Send, dialect: Dialect, limit: int) -> None:
        """Answer 413 for a body over ``limit`` bytes, in ``dialect``, and count it."""
        detail = f"the request body is larger than {limit} bytes"
        rejection = Rejection(413, "body_too_large", detail, headers=[(b"connection", b"close")])
        await self.outcomes.reject(send, dialect, rejection)

    async def serve_chat(self, exchange: Exchange, body: bytes | str | Mapping[str, Any]) -> CompletionState | None:
        """Serve one ``/chat_stream`` request whose body has been read; None when it was refused.

        The response carries the session token in ``X-Session-Id`` (and ``Set-Cookie`` for a new
        session).
        """
        return await self.serve(exchange, lambda: self.preparer.prepare(exchange.scope, body))

    async def serve(self, exchange: Exchange, prepare: Callable[[], Awaitable[PreparedChat]]) -> CompletionState | None:
        """Serve a chat request of any protocol: refused (503) while shutting down, ``prepare()`` it (a
        :class:`Rejection` is answered), then admit and stream it. None when it was refused or rejected."""
        if self._closing:
            await send_json(exchange.send, 503, exchange.dialect.shutting_down())
            return None
        try:
            async with self.outcomes.reports_cancellation(exchange):  # a session may be loading
                chat = await prepare()
        except Rejection as rejection:
            await self.outcomes.reject(exchange.send, exchange.dialect, rejection)
            return None
        return await self.replies.stream(exchange, chat)

    # -- reading --------------------------------------------------------------------------

    def get_load(self, scope: Scope | None = None, tenant: TenantSource | None = None) -> dict[str, Any]:
        """Slots in use and queue length, with the wait a new request (of the tenant ``scope`` names) would
        see, and the tokens generated so far (open replies included, so that two readings a second apart
        give the current tokens/s). With tenants on, ``tenant`` gives the caller's own share; behind a pool,
        ``engines`` gives each member's health (:class:`~chatstream_asgi.engines.base.MemberStatus`).
        ``tenant`` overrides the tenant source, as a middleware's own does for its chat requests."""
        admission, fairness = self.admission, self.config.fairness
        claim = fairness.claim(
            scope,
            session_id=None,
            body_priority=0,
            prompt_tokens=0,
            max_new_tokens=self.config.limits.max_new_tokens,
            source=tenant,
        )
        load = {
            "processing": admission.active,
            "waiting": admission.waiting,
            "max_processing": admission.max_active,
            "max_waiting": admission.max_waiting,
            "estimated_wait_seconds": admission.estimate_new(claim),
            "generated_tokens": self.replies.generated_tokens,
        }
        if fairness.tenants_on or tenant is not None:
            load["tenant"] = admission.tenant_report(claim.tenant)
        if members := self.engine.members():
            load["engines"] = [asdict(member) for member in members]
        return load

    def history_prompt(self, history: list[StoredMessage]) -> str:
        """The prompt text a session's history renders to: the conversation as it stands."""
        return self.prompts.history_prompt(history, self.default_params.max_new_tokens)


def default_params(engine: Engine, sampling: Sampling, max_new_tokens: int) -> GenerationParams:
    """The server's default sampling: what ``sampling`` sets, else the engine's model-suited values (for
    any field of :class:`GenerationParams`), else :class:`GenerationParams`' own."""
    fields = set(asdict(GenerationParams())) - {"max_new_tokens"}
    chosen = {name: value for name, value in engine.default_generation_params.items() if name in fields}
    chosen.update({name: value for name, value in asdict(sampling).items() if value is not None})
    return GenerationParams(max_new_tokens=max_new_tokens, **chosen)


class ChatStreamResponse(Response):
    """Endpoint mode: what :meth:`ChatStream.handle_chat_stream_request` returns.

    Starlette and FastAPI call a response as an ASGI app. This one binds the request id (the
    middleware has done so when it is installed) and echoes it, reads the body when the endpoint did
    not pass it (under ``max_body_size``, as the middleware does), and hands the request to the chat
    service, which streams the reply itself.
    """

    def __init__(
        self,
        chat_stream: ChatStream,
        request: Request,
        request_body: bytes | str | Mapping[str, Any] | None,
        callback: Callback | None,
    ) -> None:
        super().__init__(status_code=200, media_type=FORMATS[chat_stream.config.stream_format].media_type)
        self.chat_stream = chat_stream
        self.request = request
        self.request_body = request_body
        self.callback = callback

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        cs, config = self.chat_stream, self.chat_stream.config
        with request_id_scope(scope, send, config.request_id_header, echo=config.echo_request_id) as send:
            exchange = Exchange(
                scope, watched_receive(scope, receive), send, self.request, cs.chat_dialect, self.callback
            )
            body = self.request_body
            if body is None:
                try:
                    async with cs.outcomes.reports_cancellation(exchange):
                        body = await read_request_body(self.request, config.limits.max_body_size)
                except BodyTooLarge:
                    await cs.body_too_large(send, exchange.dialect, config.limits.max_body_size)
                    return
                except ClientDisconnect:
                    await cs.outcomes.end(exchange, CompletionState.CLIENT_DISCONNECTED_BEFORE_STREAMING)
                    return
            await cs.serve_chat(exchange, body)
