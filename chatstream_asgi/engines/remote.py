"""``OpenAIEngine``: an engine that streams from any OpenAI-compatible server over HTTP.

vLLM, TGI, the llama.cpp server or another chatstream-asgi replica generate the tokens; this
engine posts ``/v1/chat/completions`` with ``stream: true`` and hands the text deltas of the
server-sent events to the front door. Cancelling a stream closes its HTTP response, so the
remote server sees a disconnect and frees its slot.

:meth:`OpenAIEngine.probe_load` reads the remote's own load, for :class:`~chatstream_asgi.EnginePool`
to route by: chatstream-asgi's ``/get_load``, llama.cpp server's ``/slots`` or the ``/metrics`` of
vLLM, llama.cpp or TGI, whichever answers first (remembered); llama-cpp-python's server has none.

Remote failures become :class:`~chatstream_asgi.EngineError` (the front door ends the
request as ``unknown_error_occurred``: a 500 JSON error before any text, an error frame after):
:class:`EngineOverloaded` for 429 and 503 (the remote's queue is full), :class:`EngineUnavailable`
when the remote cannot be reached, plain :class:`EngineError` for any other 4xx/5xx or a broken
stream, each with the remote's message. Needs ``httpx`` (the ``remote`` extra).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from chatstream_asgi.engines.base import (
    ChatMessage,
    Engine,
    EngineError,
    GenerationParams,
    GenerationRequest,
    GenerationStream,
    QueueStream,
    RemoteLoad,
    UnsupportedFeature,
    tagged_prompt,
)
from chatstream_asgi.engines.remote_load import LOAD_PROBE_TIMEOUT, LOAD_PROBES, as_int

if TYPE_CHECKING:
    import httpx

__all__ = ["CHARS_PER_TOKEN", "EngineOverloaded", "EngineRefused", "EngineUnavailable", "OpenAIEngine", "RemoteLoad"]

logger = logging.getLogger("chatstream_asgi.remote")

CHARS_PER_TOKEN = 4
"""Without a local tokenizer, prompt tokens are estimated as characters / 4 (rounded up)."""

DEFAULT_CONTEXT_LEN = 8192
_OVERLOADED = frozenset({429, 503})
_FINISH_REASONS = {"length": "length"}  # "stop", "eos_token", "stop_sequence", ... all mean stop
_MAX_ERROR_BODY = 64 * 1024


class EngineOverloaded(EngineError):
    """The remote server is full (it answered 429 or 503); another replica may have room."""


class EngineRefused(EngineError):
    """The remote server refused this request (another 4xx answer): the request's fault, not the server's,
    so a pool keeps routing to it."""


class EngineUnavailable(EngineError):
    """The remote server could not be reached (connection refused, reset or timed out before a response)."""


class OpenAIEngine(Engine):
    """An :class:`~chatstream_asgi.Engine` backed by a remote OpenAI-compatible server.

    ``base_url`` is the server's root or its ``/v1`` root (``http://host:8000`` or
    ``http://host:8000/v1``). ``model`` is sent with each request; without it, :meth:`start`
    asks ``GET /v1/models`` (and the first request asks again if the server was down then).
    ``context_len`` bounds the history sent (prompt plus ``max_new_tokens``); without it, the
    ``max_model_len`` that vLLM reports in ``/v1/models``, else 8192.

    ``tokenizer`` (a transformers tokenizer with the remote model's chat template) makes
    :meth:`render_prompt` and :meth:`count_tokens` exact; without it the prompt is a simple
    role-tagged text and its token count an estimate (``CHARS_PER_TOKEN`` characters a token).

    ``timeout`` (seconds or an ``httpx.Timeout``) bounds connecting (at most 10 s of it) and each
    wait for the next chunk. ``client`` is an ``httpx.AsyncClient`` to use (left open at
    :meth:`shutdown`); without it the engine opens and closes its own. ``top_k``,
    ``repetition_penalty`` (and ``ignore_eos`` when set) go as extra body fields, which vLLM,
    llama.cpp and chatstream-asgi accept; ``sampling_extensions=False`` leaves them out (for
    servers that reject unknown fields, such as OpenAI's own). ``extra_body`` is merged into every
    request body (server-specific fields: llama.cpp's ``logit_bias`` or ``min_p``, vLLM's
    ``chat_template_kwargs``, ...).
    """

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = 300.0,
        client: httpx.AsyncClient | None = None,
        context_len: int | None = None,
        tokenizer: Any = None,
        sampling_extensions: bool = True,
        extra_body: Mapping[str, Any] | None = None,
    ) -> None:
        root = base_url.rstrip("/")
        self.base_url = root if root.endswith("/v1") else root + "/v1"
        self.where = self.base_url
        self.model = model
        self.api_key = api_key
        self.timeout = timeout
        self.tokenizer = tokenizer
        self.sampling_extensions = sampling_extensions
        self.extra_body = dict(extra_body or {})
        self.context_len = context_len or DEFAULT_CONTEXT_LEN
        self._context_len_given = context_len is not None
        self._client = client
        self._owns_client = client is None
        self._tasks: set[asyncio.Task[None]] = set()
        self._forward_request_id = True
        self._load_probe: tuple[str, Callable[[httpx.Response], RemoteLoad | None]] | bool | None = None

    @property
    def model_name(self) -> str:
        """The remote model's name (empty until known)."""
        return self.model or ""

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Open the HTTP client and, without ``model``, ask the server for it (a failure only logs)."""
        client = self._http()
        if self.model is None:
            try:
                await self._discover(client)
            except EngineError as exc:
                logger.warning("%s: model not known yet (%s); the first request asks again", self.base_url, exc)

    async def shutdown(self) -> None:
        """Cancel open streams (closing their responses) and close the client this engine opened."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._owns_client and self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    # -- the engine protocol --------------------------------------------------------------

    def generate(self, request: GenerationRequest) -> GenerationStream:
        """Start the remote request in a task; its deltas arrive through the returned stream."""
        stream = _RemoteStream(request.request_id)
        task = stream.loop.create_task(self._run(stream, request), name=f"openai-engine-{request.request_id}")
        stream.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return stream

    def check_params(self, params: GenerationParams) -> None:
        """A schema goes to the remote server as its ``response_format`` (it constrains and validates it);
        log-probabilities are not relayed."""
        if params.logprobs is not None:
            raise UnsupportedFeature("the remote engine does not relay log-probabilities", param="logprobs")

    def render_prompt(self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool = True) -> str:
        """The tokenizer's chat template, or ``<|role|>``-tagged text without a tokenizer."""
        if self.tokenizer is not None and getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
            )
        return tagged_prompt(messages, add_generation_prompt=add_generation_prompt)

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """Prompt tokens: counted by the tokenizer, else estimated from the length of the prompt text."""
        text = self.render_prompt(messages)
        if self.tokenizer is not None:
            return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return -(-len(text) // CHARS_PER_TOKEN)

    async def probe_load(self) -> RemoteLoad | None:
        """The remote's own load, or None when it reports none or cannot be reached now.

        Tries ``/get_load``, ``/slots``, ``/metrics`` on the server's root and keeps the first that
        answers with a load; a server that answers none of them is not asked again.
        """
        import httpx

        if self._load_probe is False:
            return None
        root = self.base_url.removesuffix("/v1")
        probes = [self._load_probe] if isinstance(self._load_probe, tuple) else list(LOAD_PROBES)
        for path, parse in probes:
            try:
                response = await self._http().get(root + path, headers=self._headers(), timeout=LOAD_PROBE_TIMEOUT)
            except httpx.TransportError:
                return None  # down for now: ask again next time
            if response.status_code != 200:
                continue
            try:
                load = parse(response)
            except ValueError:  # not JSON
                load = None
            if load is not None:
                self._load_probe = (path, parse)
                return load
        if self._load_probe is None:
            logger.info("%s reports no load (no /get_load, /slots or /metrics): routing by own counts", root)
            self._load_probe = False
        return None

    # -- internals ------------------------------------------------------------------------

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            import httpx

            timeout = self.timeout
            if not isinstance(timeout, httpx.Timeout):
                timeout = httpx.Timeout(timeout, connect=min(timeout, 10.0))
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=32)
            self._client = httpx.AsyncClient(timeout=timeout, limits=limits)
        return self._client

    def _headers(self, request_id: str | None = None) -> dict[str, str]:
        headers = {"x-request-id": request_id} if request_id else {}
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        return headers

    async def _discover(self, client: httpx.AsyncClient) -> None:
        """Learn the model name (and ``max_model_len``) from ``GET /v1/models``."""
        import httpx

        url = self.base_url + "/models"
        try:
            response = await client.get(url, headers=self._headers())
        except httpx.TransportError as exc:
            raise EngineUnavailable(f"no response from {url}: {exc!r}") from exc
        if response.status_code != 200:
            raise _status_error(url, response.status_code, response.content)
        try:
            model = response.json()["data"][0]
            name = model["id"]
        except (ValueError, LookupError, TypeError):
            raise EngineError(f"{url} answered without a model: {response.text[:200]!r}") from None
        self.model = str(name)
        if not self._context_len_given and isinstance(model.get("max_model_len"), int):
            self.context_len = model["max_model_len"]

    def _body(self, request: GenerationRequest) -> dict[str, Any]:
        params = request.params
        body: dict[str, Any] = {
            "messages": request.messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_new_tokens,
        }
        if self.model:
            body["model"] = self.model
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        if params.json_schema is not None:  # the remote server constrains its own decoding
            schema = {"name": "response", "schema": json.loads(params.json_schema), "strict": True}
            body["response_format"] = {"type": "json_schema", "json_schema": schema}
        if self.sampling_extensions:
            body["top_k"] = params.top_k
            body["repetition_penalty"] = params.repetition_penalty
            if request.ignore_eos:
                body["ignore_eos"] = True
        return {**body, **self.extra_body}

    async def _run(self, stream: _RemoteStream, request: GenerationRequest) -> None:
        try:
            await self._stream(stream, request)
        except asyncio.CancelledError:
            stream.finish("cancelled")
            raise
        except EngineError as exc:
            stream.fail(exc)
        except Exception as exc:
            error = EngineError(f"{self.base_url}: {exc!r}")
            error.__cause__ = exc
            stream.fail(error)

    async def _stream(self, stream: _RemoteStream, request: GenerationRequest) -> None:
        import httpx

        client = self._http()
        if self.model is None:
            await self._discover(client)
        url = self.base_url + "/chat/completions"
        responded = False
        request_id = request.request_id if self._forward_request_id else None
        try:
            async with client.stream(
                "POST", url, json=self._body(request), headers=self._headers(request_id)
            ) as response:
                responded = True
                if response.status_code != 200:
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) >= _MAX_ERROR_BODY:
                            break
                    if response.status_code == 400 and not body and request_id:
                        # llama-cpp-python's server answers an empty 400 to an X-Request-Id that is not a UUID.
                        logger.warning("%s refused X-Request-Id %r: not forwarding request ids", url, request_id)
                        self._forward_request_id = False
                        return await self._stream(stream, request)
                    raise _status_error(url, response.status_code, bytes(body))
                finish, usage, deltas = await _read_events(stream, response, url)
        except httpx.TransportError as exc:
            if not responded:
                raise EngineUnavailable(f"no response from {url}: {exc!r}") from exc
            raise EngineError(f"{url}: the stream broke: {exc!r}") from exc
        prompt_tokens = as_int(usage.get("prompt_tokens"))
        if prompt_tokens is None:  # the service's count where it gave one: counting here tokenizes on the loop
            prompt_tokens = request.prompt_tokens
        stream.finish(
            _FINISH_REASONS.get(finish, "stop"),  # type: ignore[arg-type]
            prompt_tokens=self.count_tokens(request.messages) if prompt_tokens is None else prompt_tokens,
            completion_tokens=as_int(usage.get("completion_tokens"), deltas),
        )


class _RemoteStream(QueueStream):
    """A stream fed by the task that reads the remote response; cancelling it cancels that task."""

    task: asyncio.Task[None] | None = None

    def cancel(self) -> None:
        super().cancel()
        if self.task is not None:
            self.call_threadsafe(self.task.cancel)


class _SSEData:
    """Accumulates the ``data:`` lines of one server-sent event; comments and other fields are ignored."""

    def __init__(self) -> None:
        self._lines: list[str] = []

    def feed(self, line: str) -> str | None:
        """The event's data when ``line`` ends an event, else None."""
        if not line:
            data, self._lines = self._lines, []
            return "\n".join(data) if data else None
        if line.startswith("data:"):
            value = line[5:]
            self._lines.append(value[1:] if value.startswith(" ") else value)
        return None

    def flush(self) -> str | None:
        return self.feed("")


async def _read_events(stream: _RemoteStream, response: httpx.Response, url: str) -> tuple[str, Mapping[str, Any], int]:
    """Push the deltas of a ``chat.completion.chunk`` stream; returns its finish reason, usage and delta count."""
    events = _SSEData()
    finish: str | None = None
    usage: Mapping[str, Any] = {}
    deltas = 0
    done = False

    def handle(data: str | None) -> None:
        nonlocal finish, usage, deltas, done
        if data is None or done:
            return
        if data == "[DONE]":
            done = True
            return
        try:
            chunk = json.loads(data)
        except ValueError:
            raise EngineError(f"{url}: not a JSON event: {data[:200]!r}") from None
        if not isinstance(chunk, Mapping):
            raise EngineError(f"{url}: not a JSON object event: {data[:200]!r}")
        if chunk.get("error"):
            raise EngineError(f"{url}: the stream failed: {_message(chunk)}")
        if isinstance(chunk.get("usage"), Mapping):
            usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            content = (choice.get("delta") or {}).get("content")
            if content:
                stream.push(content)
                deltas += 1
                stream.completion_tokens = deltas  # until the usage event says otherwise
            if choice.get("finish_reason"):
                finish = choice["finish_reason"]

    async for line in response.aiter_lines():
        handle(events.feed(line))  # after [DONE], read on to the end so the connection can be reused
    handle(events.flush())
    if not done and finish is None:
        raise EngineError(f"{url}: the stream ended before its last event")
    return finish or "stop", usage, deltas


def _message(data: Any) -> str:
    """The human-readable message of an error body (OpenAI's, chatstream-asgi's, TGI's or FastAPI's shape)."""
    if isinstance(data, Mapping):
        error = data.get("error")
        if isinstance(error, Mapping):
            return str(error.get("message") or error.get("code") or error)
        parts = [str(data[key]) for key in ("error", "detail", "message") if data.get(key)]
        if parts:
            return ": ".join(parts)
    return str(data)


def _status_error(url: str, status: int, body: bytes) -> EngineError:
    text = body.decode(errors="replace")
    with contextlib.suppress(ValueError):
        text = _message(json.loads(text))
    error = EngineOverloaded if status in _OVERLOADED else EngineRefused if 400 <= status < 500 else EngineError
    return error(f"{url} answered {status}: {text[:500]}")
