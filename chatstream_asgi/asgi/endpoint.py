"""Endpoint mode: the response that :meth:`ChatStream.handle_chat_stream_request` returns.

Starlette and FastAPI call a response as an ASGI app. This one reads the body when the endpoint
did not pass it (under the service's ``max_body_size``, as the middleware does), binds the
request id (the middleware has done so when it is installed), and hands the request to the chat
service, which streams the reply itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from chatstream_asgi.asgi.replay import BodyTooLarge, content_length
from chatstream_asgi.logs import bind_request_id, logger
from chatstream_asgi.protocols.framing import FORMATS
from chatstream_asgi.types import Callback, ChatService, Receive, Scope, Send

__all__ = ["ChatStreamResponse"]


async def read_request_body(request: Request, max_size: int) -> bytes:
    """The request's body, at most ``max_size`` bytes (:class:`BodyTooLarge` otherwise): refused on
    its Content-Length when that says too much, else counted as it arrives (chunked or lying). A
    ``receive`` that raises is a client that left (:class:`ClientDisconnect`), as in the middleware."""
    declared = content_length(request.scope)
    if declared is not None and declared > max_size:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():  # a body the endpoint already read comes back from its cache
            size += len(chunk)
            if size > max_size:
                raise BodyTooLarge
            chunks.append(chunk)
    except (BodyTooLarge, ClientDisconnect):
        raise
    except Exception as exc:
        logger.info("receive failed while the body was read (%r): treated as a disconnect", exc)
        raise ClientDisconnect from exc
    return b"".join(chunks)


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
                    async with service.reports_cancellation(self.request, self.callback):
                        body = await read_request_body(self.request, service.max_body_size)
                except BodyTooLarge:
                    await service.reject_body_too_large(send, service.max_body_size)
                    return
                except ClientDisconnect:
                    await service.report_early_disconnect(self.request, self.callback)
                    return
            await service.serve_chat(scope, receive, send, body, request=self.request, callback=self.callback)
