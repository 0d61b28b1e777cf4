"""The OpenAI-compatible endpoints: ``POST /v1/chat/completions`` and ``GET /v1/models``.

Requests are stateless (no session) and go through the same admission, completion states,
callback and metrics as ``/chat_stream``. Errors come in OpenAI's shape with 400 (invalid
request), 429 (queue full), 500 (generation failed) or 503 (shutting down).
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING

from chatstream_asgi.asgi.responses import send_json
from chatstream_asgi.engines.base import ChatMessage, GenerationParams
from chatstream_asgi.logs import current_request_id
from chatstream_asgi.protocols.chat import InvalidRequest, apply_params
from chatstream_asgi.protocols.framing import Framer
from chatstream_asgi.protocols.openai import (
    QUEUE_FULL_BODY,
    OpenAIChunkFramer,
    OpenAICompletionFramer,
    OpenAIError,
    error_body,
    parse_chat_completion,
)
from chatstream_asgi.service.chatstream import ChatStream
from chatstream_asgi.service.outcomes import ChatResult, Rejection
from chatstream_asgi.service.prompts import TemplateError
from chatstream_asgi.service.replies import PreparedChat
from chatstream_asgi.states import CompletionState
from chatstream_asgi.types import Callback, Receive, Scope, Send

if TYPE_CHECKING:
    from starlette.requests import Request

__all__ = ["OpenAIAPI"]


class OpenAIAPI:
    """Handlers of the OpenAI-compatible endpoints."""

    def __init__(self, chat_stream: ChatStream) -> None:
        self.cs = chat_stream

    async def models(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        """``GET /v1/models``: the served model."""
        model = {"id": self.cs.engine.model_name, "object": "model", "created": 0, "owned_by": "chatstream-asgi"}
        await send_json(send, 200, {"object": "list", "data": [model]})

    async def chat_completions(
        self, scope: Scope, receive: Receive, send: Send, body: bytes, *, request: Request, callback: Callback | None
    ) -> CompletionState | None:
        """``POST /v1/chat/completions``; None when the request was rejected."""
        cs = self.cs
        headers = cs.id_headers()
        if cs.closing:
            body_ = error_body("the server is shutting down", "server_error", "server_shutting_down")
            await send_json(send, 503, body_, headers)
            return None
        started_at = time.monotonic()
        try:
            stream, include_usage, messages, params, priority = self._parse(body)
            messages, prompt = await self._prepare(messages, params)
        except OpenAIError as exc:
            await cs.outcomes.reject(send, Rejection(400, "invalid_request", exc.message, exc.body()), headers)
            return None
        message_id = uuid.uuid4().hex
        completion_id, model, created = f"chatcmpl-{message_id}", cs.engine.model_name, int(time.time())
        framer: Framer = (
            OpenAIChunkFramer(completion_id, model, created, include_usage=include_usage)
            if stream
            else OpenAICompletionFramer(completion_id, model, created)
        )
        result = ChatResult(current_request_id() or "-", message_id, messages, prompt=prompt)
        chat = PreparedChat(
            result=result,
            params=params,
            framer=framer,
            headers=headers,
            queue_full=(429, QUEUE_FULL_BODY),
            request=request,
            callback=callback,
            started_at=started_at,
            priority=priority,
        )
        return await cs.stream(scope, receive, send, chat)

    def _parse(self, body: bytes) -> tuple[bool, bool, list[ChatMessage], GenerationParams, int]:
        parsed = parse_chat_completion(body)
        cs = self.cs
        try:
            params = apply_params(cs.default_params, parsed.overrides, max_new_tokens=cs.max_new_tokens)
        except InvalidRequest:
            raise OpenAIError(f"max_tokens must be at most {cs.max_new_tokens}", param="max_tokens") from None
        return parsed.stream, parsed.include_usage, parsed.messages, params, parsed.priority

    async def _prepare(self, messages: list[ChatMessage], params: GenerationParams) -> tuple[list[ChatMessage], str]:
        try:
            return await self.cs.prompts.prepare_messages(messages, params.max_new_tokens)
        except TemplateError as exc:
            raise OpenAIError(exc.detail, param="messages") from None
        except InvalidRequest as exc:
            raise OpenAIError(exc.detail, param="messages", code="context_length_exceeded") from None
