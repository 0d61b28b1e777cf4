"""The OpenAI-compatible endpoints: ``POST /v1/chat/completions`` and ``GET /v1/models``.

Requests are stateless (no session) and go through the same admission, completion states,
callback and metrics as ``/chat_stream``. Errors come in OpenAI's shape with 400 (invalid
request), 429 (queue full), 500 (generation failed) or 503 (shutting down).
"""

from __future__ import annotations

import time
import uuid

from chatstream_asgi.asgi.responses import send_json
from chatstream_asgi.engines.base import ChatMessage, GenerationParams
from chatstream_asgi.logs import current_request_id
from chatstream_asgi.protocols.chat import InvalidRequest, apply_params
from chatstream_asgi.protocols.framing import Framer
from chatstream_asgi.protocols.openai import (
    OpenAIChunkFramer,
    OpenAICompletionFramer,
    OpenAIError,
    parse_chat_completion,
)
from chatstream_asgi.server.chatstream import ChatStream
from chatstream_asgi.service.exchange import ChatResult, Exchange
from chatstream_asgi.service.outcomes import Rejection
from chatstream_asgi.service.prompts import Prompt, TemplateError
from chatstream_asgi.service.replies import PreparedChat
from chatstream_asgi.states import CompletionState
from chatstream_asgi.types import Receive, Scope, Send

__all__ = ["OpenAIAPI"]


class OpenAIAPI:
    """Handlers of the OpenAI-compatible endpoints."""

    def __init__(self, chat_stream: ChatStream) -> None:
        self.cs = chat_stream

    async def models(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        """``GET /v1/models``: the served model."""
        model = {"id": self.cs.engine.model_name, "object": "model", "created": 0, "owned_by": "chatstream-asgi"}
        await send_json(send, 200, {"object": "list", "data": [model]})

    async def chat_completions(self, exchange: Exchange, body: bytes) -> CompletionState | None:
        """``POST /v1/chat/completions``; None when the request was refused."""
        return await self.cs.serve(exchange, lambda: self._prepare(body))

    async def _prepare(self, body: bytes) -> PreparedChat:
        try:
            stream, include_usage, messages, params, priority = self._parse(body)
            prompt = await self._fit(messages, params)
        except OpenAIError as exc:
            raise Rejection(400, "invalid_request", exc.message, exc.body()) from None
        message_id = uuid.uuid4().hex
        completion_id, model, created = f"chatcmpl-{message_id}", self.cs.engine.model_name, int(time.time())
        framer: Framer = (
            OpenAIChunkFramer(completion_id, model, created, include_usage=include_usage)
            if stream
            else OpenAICompletionFramer(completion_id, model, created)
        )
        result = ChatResult(current_request_id() or "-", message_id, prompt.messages, prompt=prompt.text)
        return PreparedChat(result, params, framer, prompt_tokens=prompt.tokens, priority=priority)

    def _parse(self, body: bytes) -> tuple[bool, bool, list[ChatMessage], GenerationParams, int]:
        parsed = parse_chat_completion(body)
        cs = self.cs
        limit = cs.config.limits.max_new_tokens
        try:
            params = apply_params(cs.default_params, parsed.overrides, max_new_tokens=limit)
        except InvalidRequest:
            raise OpenAIError(f"max_tokens must be at most {limit}", param="max_tokens") from None
        return parsed.stream, parsed.include_usage, parsed.messages, params, parsed.priority

    async def _fit(self, messages: list[ChatMessage], params: GenerationParams) -> Prompt:
        try:
            return await self.cs.prompts.prepare_messages(messages, params.max_new_tokens)
        except TemplateError as exc:
            raise OpenAIError(exc.detail, param="messages") from None
        except InvalidRequest as exc:
            raise OpenAIError(exc.detail, param="messages", code="context_length_exceeded") from None
