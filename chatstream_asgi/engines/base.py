"""The engine contract: what the front door asks of a token generator, declared once.

An engine turns a :class:`GenerationRequest` (chat messages, the prompt they render to, sampling
parameters) into a :class:`GenerationStream`, an async iterator of text deltas. Engines that
generate on another thread (the transformers engine) hand deltas back through :class:`QueueStream`;
engines that generate on the event loop (the mock) may subclass :class:`GenerationStream` directly.

:class:`Engine` lists every member the service, the server, the pool and the CLI use. Subclass it:
the members an engine has no use for (a prefix cache's counters, a static cache's usage, sessions
to release, a load it can report) then have their neutral defaults, and nothing above this layer
asks whether an engine has a member. :class:`~chatstream_asgi.EnginePool` forwards each one.

Cancellation is explicit: the send loop calls :meth:`GenerationStream.cancel` when the client
leaves or the stream ends early, and the engine drops that sequence at its next step.
"""

from __future__ import annotations

import asyncio
import collections
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

__all__ = [
    "ChatMessage",
    "Engine",
    "EngineError",
    "FinishReason",
    "GenerationParams",
    "GenerationRequest",
    "GenerationStream",
    "MemberStatus",
    "PromptTooLong",
    "QueueStream",
    "RemoteLoad",
    "TokenLogprob",
    "UnsupportedFeature",
    "tagged_prompt",
    "without_credentials",
]

ChatMessage = dict[str, Any]
"""One chat message: ``{"role": "user" | "assistant" | "system" | "tool", "content": "..."}``; an
assistant message may carry ``tool_calls`` and a tool message ``tool_call_id`` (OpenAI's shapes, with
each call's ``arguments`` as a dict, as chat templates expect)."""

ToolSpec = Mapping[str, Any]
"""One tool as OpenAI's API declares it: ``{"type": "function", "function": {"name", "description", "parameters"}}``."""

FinishReason = Literal["stop", "length", "cancelled", "error"]


class EngineError(Exception):
    """Generation failed inside the engine."""


class PromptTooLong(EngineError):
    """The prompt does not fit the model's context together with ``max_new_tokens``."""


class UnsupportedFeature(EngineError):
    """The engine cannot serve what the request asks (a response schema, log-probabilities, tools): a 400
    naming why, sent before anything streams. ``param`` names the request field at fault."""

    def __init__(self, message: str, *, param: str | None = None, code: str = "unsupported_value") -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability, and the most likely tokens at its place (``top``, each
    with an empty ``top`` of its own). ``token`` is the token's text, ``raw`` its bytes."""

    token: str
    logprob: float
    raw: bytes
    top: tuple[TokenLogprob, ...] = ()


def tagged_prompt(messages: Sequence[ChatMessage], *, add_generation_prompt: bool = True) -> str:
    """``<|role|>``-tagged text: the prompt of an engine without a chat template."""
    text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
    return text + "<|assistant|>\n" if add_generation_prompt else text


@dataclass(frozen=True)
class GenerationParams:
    """Sampling parameters of one request. ``temperature == 0`` means greedy decoding.

    ``json_schema`` and ``logprobs`` ask more than sampling: an engine that cannot serve them refuses them
    in :meth:`Engine.check_params`, before the request is admitted.

    ``repetition_penalty`` divides (multiplies, when negative) the logit of every token already seen,
    once per distinct token; ``penalize_prompt_tokens`` says whether the prompt's tokens count as seen
    (as in transformers and vLLM) or only the reply's (an answer may then reuse the question's words:
    "What is 2 + 2?" → "... is 4").
    """

    temperature: float = 0.7
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None
    penalize_prompt_tokens: bool = True
    json_schema: str | None = None
    """The reply must be JSON valid against this JSON Schema (its JSON text): decoding is constrained to it."""
    logprobs: int | None = None
    """Report each generated token's log-probability and this many alternatives (0 to 20); None: none."""


@dataclass
class GenerationRequest:
    """What the front door hands an engine: the conversation so far and how to sample.

    ``prompt`` is ``messages`` as the engine's :meth:`Engine.render_prompt` rendered them and
    ``prompt_tokens`` its count by :meth:`Engine.count_tokens`: the service fits the conversation
    to the context with them (off the event loop for a long one), so an engine uses them rather
    than render again; ``None`` (a request built by hand) lets the engine render ``messages`` itself.
    An engine that sends messages elsewhere (a remote) uses ``messages``. ``prompt_ids`` are the
    prompt's token ids as :meth:`Engine.prepare` filled them in (``None``: the engine tokenizes in
    :meth:`Engine.generate`).

    ``session_key`` names the conversation (the same for all its turns, ``None`` for stateless
    requests): a pool sends a conversation's turns to the engine that served the last one, whose
    prefix cache holds it, and an engine can free what it held when the conversation is cleared.
    """

    request_id: str
    messages: list[ChatMessage]
    params: GenerationParams = field(default_factory=GenerationParams)
    ignore_eos: bool = False
    session_key: str | None = None
    prompt: str | None = None
    prompt_tokens: int | None = None
    prompt_ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class RemoteLoad:
    """An engine's own report of its load: requests running or waiting there (from every client,
    not only this front end), its slots when it says, and which endpoint said so."""

    busy: int
    capacity: int | None = None
    source: str = ""


@dataclass(frozen=True)
class MemberStatus:
    """One engine behind a pool as ``/get_load`` and the metrics show it: ``where`` it runs (a device or a
    URL), whether the pool routes to it, its open streams, the seconds until it is tried again while it is
    down, and the failure that put it down (``""`` when none). Both texts are public (``/get_load`` needs
    no credentials): build them with :func:`without_credentials`."""

    where: str
    healthy: bool
    active: int
    retry_in: float = 0.0
    error: str = ""


_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def without_credentials(text: str) -> str:
    """``text`` with the ``user:password@`` of every URL in it removed (``http://u:p@host`` → ``http://host``)."""
    return _USERINFO.sub("", text)


class GenerationStream:
    """Async iterator of text deltas for one request.

    After iteration ends, :attr:`finish_reason`, :attr:`prompt_tokens` and
    :attr:`completion_tokens` describe the generation; :attr:`cached_tokens` of the prompt tokens
    were not computed again but reused from the engine's prefix cache. :meth:`cancel` may be called from any
    thread, any number of times; iteration then ends with ``finish_reason == "cancelled"``.
    """

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.finish_reason: FinishReason | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_tokens = 0
        self._cancelled = threading.Event()

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called."""
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Ask the engine to stop this sequence at its next step."""
        self._cancelled.set()

    def take_logprobs(self) -> list[TokenLogprob]:
        """The log-probabilities of the tokens behind the delta last returned (once iteration ended: of
        the tokens that gave no text, such as the end of sequence); empty unless ``logprobs`` was asked."""
        return []

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError


class QueueStream(GenerationStream):
    """A stream fed by a producer on another thread.

    The producer calls :meth:`push`, :meth:`finish` and :meth:`fail` from any thread; these
    are delivered to the consumer's event loop in order. Several deltas of one engine step
    may be delivered with a single :meth:`push_many_threadsafe` call per loop wake-up.
    """

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(request_id)
        self._loop = loop or asyncio.get_running_loop()
        self._items: collections.deque[str] = collections.deque()
        self._logprobs: collections.deque[list[TokenLogprob]] = collections.deque()  # one list per item
        self._unsent_logprobs: list[TokenLogprob] = []  # of tokens pushed without text so far
        self._current_logprobs: list[TokenLogprob] = []
        self._done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The consumer's event loop, where the producer methods must run."""
        return self._loop

    # -- consumer side (event loop) ---------------------------------------------------------

    async def __anext__(self) -> str:
        while not self._items:
            if self._error is not None:
                raise self._error
            if self._done:
                raise StopAsyncIteration
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        self._current_logprobs = self._logprobs.popleft()
        return self._items.popleft()

    def take_logprobs(self) -> list[TokenLogprob]:
        if not self._items and self._done and self._unsent_logprobs:  # iteration ended
            self._current_logprobs, self._unsent_logprobs = self._unsent_logprobs, []
        taken, self._current_logprobs = self._current_logprobs, []
        return taken

    # -- producer side, must run on the loop ------------------------------------------------

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def push(
        self, text: str, *, completion_tokens: int | None = None, logprobs: list[TokenLogprob] | None = None
    ) -> None:
        """Append a text delta (call on the event loop); ``completion_tokens`` is the count so far,
        so that a stream cancelled before its finish arrives still reports what was generated;
        ``logprobs``: the tokens' log-probabilities (kept for the next delta when ``text`` is empty)."""
        if completion_tokens is not None and not self._done:
            self.completion_tokens = completion_tokens
        if logprobs:
            self._unsent_logprobs.extend(logprobs)
        if text:
            self._append(text)
            self._wake()

    def _append(self, text: str) -> None:
        self._items.append(text)
        self._logprobs.append(self._unsent_logprobs)
        self._unsent_logprobs = []

    def finish(
        self,
        reason: FinishReason,
        *,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        tail: str = "",
    ) -> None:
        """End the stream (call on the event loop); ``tail`` is a last delta, if any."""
        if self._done:
            return
        if tail:
            self._append(tail)
        if prompt_tokens is not None:
            self.prompt_tokens = prompt_tokens
        if completion_tokens is not None:
            self.completion_tokens = completion_tokens
        self.finish_reason = reason
        self._done = True
        self._wake()

    def fail(self, error: BaseException) -> None:
        """End the stream with an error raised to the consumer (call on the event loop)."""
        if self._done:
            return
        self.finish_reason = "error"
        self._error = error
        self._done = True
        self._wake()

    # -- producer side, any thread ----------------------------------------------------------

    def call_threadsafe(self, fn: object, *args: object, **kwargs: object) -> None:
        """Run ``fn(*args, **kwargs)`` (one of the producer methods) on the consumer's loop."""
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(lambda: fn(*args, **kwargs))  # type: ignore[operator]


class Engine:
    """What every engine provides; engines are shared by all requests of a process.

    A subclass must set :attr:`model_name` and :attr:`context_len` and implement :meth:`generate`,
    :meth:`render_prompt` and :meth:`count_tokens`; every other member has a default that suits an
    engine without that feature. The service reads them all directly, so an engine that does not
    subclass :class:`Engine` must define every member itself.
    """

    model_name: str
    context_len: int

    default_generation_params: Mapping[str, Any] = MappingProxyType({})
    """The sampling that suits the model, by :class:`GenerationParams` field (``temperature``,
    ``repetition_penalty``, ``penalize_prompt_tokens``, ...); ``ChatStream`` uses them where its own
    options are unset. Empty: :class:`GenerationParams`' defaults."""
    max_batch_size: int | None = None
    """Sequences generated at once (its slots), where the engine has a fixed number."""
    kv_cache_usage: float = 0.0
    """Share of a static KV cache's slots in use (``chatstream_kv_cache_usage_ratio``); 0 without one."""
    prefix_hit_tokens: int = 0
    """Prompt tokens reused from a prefix cache so far (``chatstream_prefix_cache_hit_tokens_total``)."""
    prefill_tokens: int = 0
    """Prompt tokens computed by prefill so far (``chatstream_prefill_tokens_total``)."""
    where: str = ""
    """Where it generates (a device such as ``cuda:1``, a server's URL), for logs and a pool's status."""

    async def start(self) -> None:
        """Load and start (idempotent). Called at lifespan startup or on first use."""

    async def shutdown(self) -> None:
        """Stop generating and release resources; open streams end with ``cancelled``."""

    def generate(self, request: GenerationRequest) -> GenerationStream:
        """Begin generating; must not block the event loop (beyond what :meth:`prepare` leaves to it)."""
        raise NotImplementedError

    def prepare(self, request: GenerationRequest) -> GenerationRequest:
        """The part of :meth:`generate` that takes time in proportion to the prompt (rendering and
        tokenizing it), done ahead: ``request`` with what :meth:`generate` would compute filled in
        (``prompt``, ``prompt_ids``), which :meth:`generate` then uses. Safe to call from a worker
        thread; the service does, for a long prompt, since tokenizing one on the event loop stalls every
        stream of the process meanwhile (2,000 tokens: 2-6 ms). The default, for an engine that
        tokenizes nothing, returns ``request``."""
        return request

    def render_prompt(
        self,
        messages: Sequence[ChatMessage],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[ToolSpec] | None = None,
    ) -> str:
        """The prompt text the model would see for ``messages`` (the chat template); with
        ``add_generation_prompt=False`` the conversation as it stands, without the opening of the next reply.
        ``tools`` (only passed where :attr:`tool_call_format` is set) are rendered by the template."""
        raise NotImplementedError

    def count_tokens(self, messages: Sequence[ChatMessage], *, tools: Sequence[ToolSpec] | None = None) -> int:
        """Number of prompt tokens for ``messages`` (and ``tools``, as :meth:`render_prompt` takes them)."""
        raise NotImplementedError

    tool_call_format: str | None = None
    """How the model's chat template renders tools and asks for calls: ``"hermes"`` (``<tool_call>`` blocks
    around JSON, as Qwen's), ``"json"`` (a bare JSON call, as Llama 3.1's); None: the template has no tool
    support (``tools`` are then never passed to :meth:`render_prompt`)."""

    def check_params(self, params: GenerationParams) -> None:
        """Raise :class:`UnsupportedFeature` when this engine cannot serve ``params``' ``json_schema`` or
        ``logprobs`` (or the schema is invalid or too complex for it). Called before admission, off the
        event loop (compiling a schema can take a while); the default serves neither."""
        if params.json_schema is not None:
            raise UnsupportedFeature("this engine cannot constrain its output to a schema", param="response_format")
        if params.logprobs is not None:
            raise UnsupportedFeature("this engine does not report log-probabilities", param="logprobs")

    def release_session(self, session_key: str) -> int:
        """Free what the conversation ``session_key`` holds in the engine (its context was cleared);
        returns the KV tokens freed."""
        return 0

    def members(self) -> tuple[MemberStatus, ...]:
        """The engines behind this one (a pool's members), each with its health; empty for a single engine."""
        return ()

    async def probe_load(self) -> RemoteLoad | None:
        """The engine's own report of its load (a remote server's), for a pool to route by; None: no report."""
        return None
