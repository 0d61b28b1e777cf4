"""The OpenAI-compatible endpoints: ``POST /v1/chat/completions`` and ``GET /v1/models``.

Requests are stateless (no session) and go through the same admission, completion states,
callback and metrics as ``/chat_stream``. Errors come in OpenAI's shape with 400 (invalid
request, an unsupported ``response_format``, ``tools`` or ``logprobs``, a schema the engine cannot
compile: all before anything streams, counted as ``invalid_request``), 429 (queue full), 500
(generation failed) or 503 (shutting down).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import replace

from chatstream_asgi.asgi.responses import send_json
from chatstream_asgi.engines.base import ChatMessage, GenerationParams
from chatstream_asgi.logs import current_request_id
from chatstream_asgi.protocols.chat import InvalidRequest, apply_params
from chatstream_asgi.protocols.framing import Framer
from chatstream_asgi.protocols.openai import (
    ChatCompletionRequest,
    OpenAIChunkFramer,
    OpenAICompletionFramer,
    OpenAIError,
    parse_chat_completion,
)
from chatstream_asgi.protocols.structured import FormatError
from chatstream_asgi.protocols.tools import ToolPlan, plain_tool_messages, plan_tools
from chatstream_asgi.server.chatstream import ChatStream
from chatstream_asgi.service.exchange import ChatResult, Exchange
from chatstream_asgi.service.features import UnsupportedFeature, check_features
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
        plan = None
        try:
            parsed = parse_chat_completion(body)
            params, plan = self._params(parsed)
            messages = self._messages(parsed.messages, plan)
            await check_features(self.cs.engine, params)
            prompt = await self._fit(messages, params, plan)
        except (FormatError, UnsupportedFeature) as exc:
            # A schema made from tools is refused as the engine's response_format: name what the client sent.
            param = "tools" if plan is not None and exc.param == "response_format" else exc.param
            error = OpenAIError(exc.message, param=param, code=exc.code)
            raise Rejection(400, "invalid_request", exc.message, error.body()) from None
        except OpenAIError as exc:
            raise Rejection(400, "invalid_request", exc.message, exc.body()) from None
        message_id = uuid.uuid4().hex
        completion_id, model, created = f"chatcmpl-{message_id}", self.cs.engine.model_name, int(time.time())
        extras = {"tools": plan.parser() if plan else None, "logprobs": params.logprobs is not None}
        framer: Framer = (
            OpenAIChunkFramer(completion_id, model, created, include_usage=parsed.include_usage, **extras)
            if parsed.stream
            else OpenAICompletionFramer(completion_id, model, created, **extras)
        )
        result = ChatResult(current_request_id() or "-", message_id, prompt.messages, prompt=prompt.text)
        return PreparedChat(result, params, framer, prompt_tokens=prompt.tokens, priority=parsed.priority)

    def _params(self, parsed: ChatCompletionRequest) -> tuple[GenerationParams, ToolPlan | None]:
        """The sampling, the reply's schema and log-probabilities, and how tools shape the reply."""
        cs = self.cs
        limit = cs.config.limits.max_new_tokens
        try:
            params = apply_params(cs.default_params, parsed.overrides, max_new_tokens=limit)
        except InvalidRequest:
            raise OpenAIError(f"max_tokens must be at most {limit}", param="max_tokens") from None
        plan = plan_tools(parsed.tools, cs.engine.tool_call_format) if parsed.tools is not None else None
        schema = plan.json_schema() if plan is not None else parsed.json_schema
        return replace(params, json_schema=schema, logprobs=parsed.logprobs), plan

    def _messages(self, messages: list[ChatMessage], plan: ToolPlan | None) -> list[ChatMessage]:
        """The conversation as the engine's template takes it: earlier calls as text where it has no tool
        support, and the tools described in the system message where they are not rendered by it."""
        if self.cs.engine.tool_call_format is None:
            messages = plain_tool_messages(messages)
        note = plan.system_note() if plan is not None else None
        if note is None:
            return messages
        if messages[0]["role"] == "system":
            return [{"role": "system", "content": f"{note}\n\n{messages[0]['content']}"}, *messages[1:]]
        base = self.cs.prompts.system_prompt
        return [{"role": "system", "content": f"{note}\n\n{base}" if base else note}, *messages]

    async def _fit(self, messages: list[ChatMessage], params: GenerationParams, plan: ToolPlan | None) -> Prompt:
        tools = plan.template_tools if plan is not None else None
        try:
            return await self.cs.prompts.prepare_messages(messages, params.max_new_tokens, tools)
        except TemplateError as exc:
            raise OpenAIError(exc.detail, param="messages") from None
        except InvalidRequest as exc:
            raise OpenAIError(exc.detail, param="messages", code="context_length_exceeded") from None
