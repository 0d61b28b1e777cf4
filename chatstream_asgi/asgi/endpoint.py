"""Endpoint mode: the response that :meth:`ChatStream.handle_chat_stream_request` returns.

Starlette and FastAPI call a response as an ASGI app. This one reads the body when the endpoint
did not pass it, binds the request id (the middleware has done so when it is installed), and
hands the request to the chat service, which streams the reply itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from chatstream_asgi.logs import bind_request_id
from chatstream_asgi.protocols.framing import FORMATS
from chatstream_asgi.types import Callback, ChatService, Receive, Scope, Send

__all__ = ["ChatStreamResponse"]


class ChatStreamResponse(Response):
    """Streams the reply to ``request``; ``request_body`` is the body the endpoint already read, if any."""

    def __init__(
        self,
        chat_service: ChatService,
        request: Request,
        request_body: bytes | str | Mapping[str, Any] | None,
        callback: Callback | None,
    ) -> None:
        super().__init__(status_code=200, media_type=FORMATS[chat_service.stream_format].media_type)
        self.chat_service = chat_service
        self.request = request
        self.request_body = request_body
        self.callback = callback

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        service = self.chat_service
        with bind_request_id(scope, service.request_id_header):
            body = self.request_body
            if body is None:
                try:
                    body = await self.request.body()
                except ClientDisconnect:
                    await service.report_early_disconnect(self.request, self.callback)
                    return
            await service.serve_chat(scope, receive, send, body, request=self.request, callback=self.callback)
