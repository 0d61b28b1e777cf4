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

from .admission import Admission, QueueFull
from .chat_request import ChatRequest, InvalidRequest, apply_params, parse_chat_request
from .engine import Engine, GenerationParams, GenerationRequest, Message, PromptTooLong
from .formats import FORMATS
from .metrics import Metrics
from .mock import MockEngine, MockParams
from .responses import send_bytes, send_json
from .sendloop import Reply
from .states import CompletionState

if TYPE_CHECKING:
    from .sendloop import Receive, Send

__all__ = ["Callback", "ChatResult", "ChatStream", "ChatStreamResponse", "get_result"]

logger = logging.getLogger("chatstream_asgi")

Callback = Callable[[Request, CompletionState], Awaitable[None] | None]
"""``callback(request, state)``, sync or async, called once when a reply ends."""

RESULT_KEY = "chatstream"
SHARED_RECEIVE_KEY = "chatstream_asgi.receive"
_REQUEST_ID = re.compile(r"^[\w.:@/+=-]{1,128}$")


@dataclass
class ChatResult:
    """What a completion callback can read, as ``request.state.chatstream`` or via :func:`get_result`."""

    request_id: str
    message_id: str
    messages: list[Message]
    """The conversation the reply was generated for (history included)."""
    reply: str = ""
    """The reply text that was sent (partial when the client left mid-stream)."""
    state: CompletionState | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
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
        self.send_timeout = send_timeout
        self.shutdown_timeout = shutdown_timeout
        self.metrics = Metrics(metrics_registry)
        self.metrics.observe_admission(self.admission)
        self._formats = frozenset(FORMATS)
        self._replies: set[Reply] = set()
        self._started = False
        self._closing = False

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Start the engine (idempotent). Called on lifespan startup or on first request."""
        if not self._started:
            self._started = True
            await self.engine.start()

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop admitting, let open replies finish for ``timeout`` seconds, abort the rest."""
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
        """Serve one chat request whose body has been read; None when it was rejected."""
        started_at = time.monotonic()
        log = self._request_log(scope)
        request_id = log.extra["request_id"]  # type: ignore[index]
        id_headers = [(b"x-request-id", request_id.encode())]
        if self._closing:
            await send_json(send, 503, {"error": "server_shutting_down"}, id_headers)
            return None
        try:
            chat_request = parse_chat_request(body, formats=self._formats)
            messages = self.build_messages(scope, chat_request)
            params = apply_params(
                self.default_params, chat_request.generation_params, max_new_tokens=self.max_new_tokens
            )
            self._check_prompt_fits(messages, params)
        except InvalidRequest as exc:
            return await self._reject(send, 400, "invalid_request", exc.detail, id_headers, log)
        try:
            ticket = self.admission.enter()
        except QueueFull:
            return await self._reject_queue_full(send, id_headers, log)

        await self.start()
        message_id = uuid.uuid4().hex
        framer = FORMATS[chat_request.format or self.stream_format]()
        result = ChatResult(request_id, message_id, messages, chat_request=chat_request)
        scope.setdefault("state", {})[RESULT_KEY] = result
        reply = Reply(
            engine=self.engine,
            request=GenerationRequest(request_id, messages, params),
            message_id=message_id,
            ticket=ticket,
            framer=framer,
            headers=[
                (b"content-type", framer.media_type.encode()),
                (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no"),
                (b"x-chatstream-last-generated-message-id", message_id.encode()),
                *id_headers,
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
        log = self._request_log(scope)
        log.info("client disconnected while sending the body")
        self.metrics.completions.labels(state=state.value).inc()
        await self._call_callback(scope, request, callback, state, log)
        return state

    async def serve_get_load(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        """``GET /get_load``: how busy the service is."""
        await send_json(send, 200, self.get_load())

    async def serve_metrics(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        """``GET /metrics``: Prometheus text format."""
        await send_bytes(send, 200, self.metrics.render(), self.metrics.content_type)

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

    def build_messages(self, scope: MutableMapping[str, Any], chat_request: ChatRequest) -> list[Message]:
        """The conversation to generate a reply for."""
        if chat_request.regenerate:
            raise InvalidRequest("regenerate needs a previous reply in this conversation")
        messages = list(chat_request.messages or [{"role": "user", "content": chat_request.user_input or ""}])
        if self.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    def _check_prompt_fits(self, messages: list[Message], params: GenerationParams) -> None:
        budget = self.engine.context_len - params.max_new_tokens
        try:
            used = self.engine.count_tokens(messages)
        except PromptTooLong as exc:
            raise InvalidRequest(str(exc)) from None
        if used > budget:
            raise InvalidRequest(
                f"the prompt has {used} tokens; at most {budget} fit with max_new_tokens="
                f"{params.max_new_tokens} in a context of {self.engine.context_len}"
            )

    # -- helpers ----------------------------------------------------------------------------

    def _request_log(self, scope: MutableMapping[str, Any]) -> _RequestLog:
        request_id = None
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                if _REQUEST_ID.match(candidate):
                    request_id = candidate
                break
        return _RequestLog(logger, {"request_id": request_id or uuid.uuid4().hex[:16]})

    async def _reject(
        self,
        send: Send,
        status: int,
        reason: str,
        detail: str,
        headers: list[tuple[bytes, bytes]],
        log: _RequestLog,
    ) -> None:
        log.info("rejected: %s (%s)", reason, detail)
        self.metrics.rejected.labels(reason=reason).inc()
        await send_json(send, status, {"error": reason, "detail": detail}, headers)

    async def _reject_queue_full(self, send: Send, headers: list[tuple[bytes, bytes]], log: _RequestLog) -> None:
        log.info("rejected: queue full")
        self.metrics.rejected.labels(reason="queue_full").inc()
        status = 429 if self.too_many_request_as_http_error else 200
        wait = self.admission.estimated_wait(self.admission.waiting + 1)
        retry_after = [(b"retry-after", str(max(1, round(wait))).encode())] if wait is not None else []
        await send_json(send, status, {"error": "too_many_requests"}, [*headers, *retry_after])

    async def _complete(
        self,
        scope: MutableMapping[str, Any],
        reply: Reply,
        result: ChatResult,
        request: Request | None,
        callback: Callback | None,
        log: _RequestLog,
    ) -> None:
        state = reply.state
        result.state = state
        result.reply = reply.text
        if reply.stream is not None:
            result.finish_reason = reply.stream.finish_reason
            result.prompt_tokens = reply.stream.prompt_tokens
            result.completion_tokens = reply.stream.completion_tokens
        self.metrics.completions.labels(state=state.value).inc()
        log.info("completed: %s (%d tokens)", state.value, result.completion_tokens)
        await self._call_callback(scope, request, callback, state, log)

    async def _call_callback(
        self,
        scope: MutableMapping[str, Any],
        request: Request | None,
        callback: Callback | None,
        state: CompletionState,
        log: _RequestLog,
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
