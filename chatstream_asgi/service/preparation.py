"""From a ``/chat_stream`` body to a :class:`~chatstream_asgi.service.replies.PreparedChat`.

Parse and validate the body, open the session of a ``user_input`` request (its cookie or
``X-Session-Id``; a fresh session when missing, tampered or expired), merge the generation
parameters (request over session over server defaults) and fit the conversation into the context.
A ``messages`` request is stateless and leaves the session alone. Anything wrong raises a
:class:`~chatstream_asgi.service.outcomes.Rejection`.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from chatstream_asgi.engines.base import GenerationParams
from chatstream_asgi.logs import current_request_id, logger
from chatstream_asgi.protocols.chat import InvalidRequest, apply_params, parse_chat_request
from chatstream_asgi.protocols.framing import FORMATS
from chatstream_asgi.service.exchange import ChatResult
from chatstream_asgi.service.features import UnsupportedFeature, check_features
from chatstream_asgi.service.outcomes import Rejection
from chatstream_asgi.service.prompts import PromptBuilder, start_turn
from chatstream_asgi.service.replies import PreparedChat
from chatstream_asgi.sessions.manager import OpenSession, SessionManager
from chatstream_asgi.types import Headers, Scope

__all__ = ["ChatPreparer", "session_store_unavailable"]

_FORMATS = frozenset(FORMATS)


def session_store_unavailable() -> Rejection:
    """The answer when the session store fails (an unreachable Redis): 503, counted as
    ``session_store_unavailable``; the next request tries the store again."""
    logger.exception("loading the session failed")
    return Rejection(503, "session_store_unavailable", "the session store is unavailable")


@dataclass
class ChatPreparer:
    """Prepares ``/chat_stream`` requests with the server's defaults."""

    sessions: SessionManager
    prompts: PromptBuilder
    default_params: GenerationParams
    max_new_tokens: int
    stream_format: str

    async def prepare(self, scope: Scope, body: bytes | str | Mapping[str, Any]) -> PreparedChat:
        """The chat ``body`` asks for, or a :class:`Rejection` (with the session's headers, once opened)."""
        try:
            chat_request = parse_chat_request(body, formats=_FORMATS)
        except InvalidRequest as exc:
            raise Rejection(400, "invalid_request", exc.detail) from None
        opened = None
        headers: Headers = []
        if chat_request.messages is None:
            opened = await self._open_session(scope)
            headers = self.sessions.headers(opened)
        overrides = chat_request.generation_params
        if opened is not None:
            overrides = {**opened.session.generation_params, **overrides}
        turn = None
        try:
            params = apply_params(self.default_params, overrides, max_new_tokens=self.max_new_tokens)
            if chat_request.json_schema is not None:
                params = replace(params, json_schema=chat_request.json_schema)
                await check_features(self.prompts.engine, params)
            if opened is None:
                assert chat_request.messages is not None
                prompt = await self.prompts.prepare_messages(chat_request.messages, params.max_new_tokens)
            else:
                history = opened.session.messages
                turn = start_turn(history, chat_request.user_input, regenerate=chat_request.regenerate)
                prompt = await self.prompts.prepare_turn(turn, params.max_new_tokens)
        except InvalidRequest as exc:
            raise Rejection(400, "invalid_request", exc.detail, headers=headers) from None
        except UnsupportedFeature as exc:
            raise Rejection(400, "invalid_request", exc.message, headers=headers) from None
        result = ChatResult(
            request_id=current_request_id() or "-",
            message_id=uuid.uuid4().hex,
            messages=prompt.messages,
            prompt=prompt.text,
            session_id=opened.session.id if opened else None,
            session=opened.session if opened else None,
            turn=turn,
            chat_request=chat_request,
        )
        framer = FORMATS[chat_request.format or self.stream_format]()
        return PreparedChat(
            result, params, framer, prompt_tokens=prompt.tokens, headers=headers, priority=chat_request.priority
        )

    async def _open_session(self, scope: Scope) -> OpenSession:
        try:
            return await self.sessions.open(scope)
        except Exception:  # the session store failed (an unreachable Redis, say)
            raise session_store_unavailable() from None
