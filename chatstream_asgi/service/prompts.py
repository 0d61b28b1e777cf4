"""A session's conversation: messages with ids, regenerate, and fitting the prompt to the context.

History is a list of :data:`~chatstream_asgi.sessions.store.StoredMessage` (``{"id", "role",
"content"}``). A reply's id is the one sent in ``X-ChatStream-Last-Generated-Message-Id``. Only a
finished turn is stored: the user message together with its reply (whole, or partial when the
client left mid-stream).
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import anyio

from chatstream_asgi.engines.base import ChatMessage, Engine, GenerationRequest, PromptTooLong, ToolSpec
from chatstream_asgi.protocols.chat import InvalidRequest
from chatstream_asgi.sessions.store import StoredMessage

__all__ = [
    "Prompt",
    "PromptBuilder",
    "TemplateError",
    "Turn",
    "commit_turn",
    "fit_to_budget",
    "new_message",
    "plain",
    "public",
    "start_turn",
]

T = TypeVar("T")


def new_message(role: str, content: str, message_id: str | None = None, tokens: int | None = None) -> StoredMessage:
    """A history message with a fresh id (or ``message_id``) and, when known, its token count."""
    message: StoredMessage = {"id": message_id or uuid.uuid4().hex, "role": role, "content": content}
    if tokens is not None:
        message["tokens"] = tokens
    return message


def public(messages: Iterable[StoredMessage]) -> list[StoredMessage]:
    """The messages as the API shows them: without the stored token counts."""
    return [{k: v for k, v in m.items() if k != "tokens"} for m in messages]


def plain(messages: Iterable[StoredMessage]) -> list[ChatMessage]:
    """The messages as the engine takes them: role and content only."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


@dataclass(frozen=True)
class Prompt:
    """A conversation fitted to the context, as the model will see it: rendered and counted once."""

    messages: list[ChatMessage]
    text: str
    """``messages`` through the chat template, with the opening of the reply."""
    tokens: int
    """The engine's token count of ``messages``."""


@dataclass
class Turn:
    """A reply being generated in a session: the history it follows and the user message it answers."""

    history: list[StoredMessage]
    user: StoredMessage
    regenerate: bool = False


def start_turn(history: Sequence[StoredMessage], user_input: str | None, *, regenerate: bool) -> Turn:
    """The next turn. ``regenerate`` answers the last user message again (``user_input`` is ignored)."""
    if regenerate:
        for i in range(len(history) - 1, -1, -1):
            if history[i]["role"] == "user":
                return Turn(list(history[:i]), history[i], regenerate=True)
        raise InvalidRequest("regenerate needs a previous user message in this conversation")
    return Turn(list(history), new_message("user", user_input or ""))


def commit_turn(
    history: Sequence[StoredMessage], turn: Turn, reply: StoredMessage, max_messages: int | None = None
) -> list[StoredMessage]:
    """``history`` (as stored now) with the turn's reply; a regenerated reply replaces the old one.
    Beyond ``max_messages`` the oldest turns are dropped (whole turns: it starts with a user message)."""
    for i, message in enumerate(history):
        if message["id"] == turn.user["id"]:
            committed = [*history[: i + 1], reply]
            break
    else:
        committed = [*history, turn.user, reply]
    if max_messages is not None and len(committed) > max_messages:
        first = len(committed) - max_messages
        starts = [i for i in range(first, len(committed)) if committed[i]["role"] == "user"]
        committed = committed[starts[0] if starts else len(committed) - 2 :]
    return committed


def fit_to_budget(
    count_tokens: Callable[[Sequence[ChatMessage]], int],
    system: Sequence[ChatMessage],
    history: Sequence[StoredMessage],
    tail: Sequence[ChatMessage],
    budget: int,
) -> tuple[list[ChatMessage], int]:
    """``system + history + tail``, dropping the oldest turns of ``history`` until it fits ``budget``
    tokens, and its token count. Raises :class:`InvalidRequest` when even ``system + tail`` does not fit.

    Dropping turns only shortens the prompt, so the first start that fits is found by bisection:
    a long history costs O(log turns) token counts, not one per turn. When every history message
    carries its stored ``"tokens"``, the start is first estimated from them and then checked
    exactly, usually with one or two counts.
    """

    counted: dict[int, int] = {}

    def build(start: int) -> list[ChatMessage]:
        return [*system, *plain(history[start:]), *tail]

    def fits(start: int) -> tuple[bool, int]:
        messages = build(start)
        if not messages:  # nothing to render (some templates refuse an empty conversation)
            return True, 0
        try:
            used = counted[start] = count_tokens(messages)
        except PromptTooLong as exc:
            raise InvalidRequest(str(exc)) from None
        return used <= budget, used

    def fitted(start: int) -> tuple[list[ChatMessage], int]:
        return build(start), counted[start] if start in counted else fits(start)[1]

    # Where a turn may start: the beginning, each later user message, or nothing kept.
    starts = [0, *(i for i, m in enumerate(history) if m["role"] == "user" and i > 0), len(history)]
    ok, used = fits(starts[-1])
    if not ok:
        raise InvalidRequest(f"the prompt has {used} tokens; at most {budget} fit")
    lo, hi = 0, len(starts) - 1  # starts[hi] fits; find the smallest index that does
    guess = _estimate(history, starts, budget - used)
    if guess is not None and guess < hi:
        if not fits(starts[guess])[0]:
            lo = guess + 1
        elif guess == 0 or not fits(starts[guess - 1])[0]:
            return fitted(starts[guess])
        else:
            hi = guess - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(starts[mid])[0]:
            hi = mid
        else:
            lo = mid + 1
    return fitted(starts[hi])


def _estimate(history: Sequence[StoredMessage], starts: list[int], room: int) -> int | None:
    """The index in ``starts`` of the earliest start whose stored token counts fit ``room``
    (tokens left beside system and tail); None when some message has no stored count."""
    counts = [m.get("tokens") for m in history]
    if not all(isinstance(c, int) for c in counts):
        return None
    total = 0
    suffix = [0] * (len(history) + 1)
    for i in range(len(history) - 1, -1, -1):
        total += counts[i]  # type: ignore[operator]
        suffix[i] = total
    return next(index for index, start in enumerate(starts) if suffix[start] <= room)


class TemplateError(InvalidRequest):
    """The model's chat template (or tokenizer) cannot render the conversation."""


class PromptBuilder:
    """Fits conversations into the engine's context: system prompt first, then as many of the most
    recent turns as leave room for ``max_new_tokens``.

    The ``prepare_*`` coroutines run the token counting and the chat template off the event loop
    (one worker thread at a time) once a conversation is longer than ``HEAVY_CHARS``: a long
    conversation must not stall every other stream of the process. A template or tokenizer that
    fails raises :class:`TemplateError` (a 400), never a bare 500.
    """

    HEAVY_CHARS = 4096

    def __init__(self, engine: Engine, system_prompt: str | None) -> None:
        self.engine = engine
        self.system_prompt = system_prompt
        self._limiter: anyio.CapacityLimiter | None = None  # fitting prompts, before admission
        self._admitted: anyio.CapacityLimiter | None = None  # tokenizing admitted requests' prompts

    def system_messages(self) -> list[ChatMessage]:
        """The configured system prompt as a message list (empty without one)."""
        return [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []

    def _budget(self, max_new_tokens: int) -> int:
        return self.engine.context_len - max_new_tokens

    def count_tokens(self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec] | None = None) -> int:
        """The engine's token count (with ``tools`` rendered, where given); :class:`TemplateError` when the
        template or tokenizer fails."""
        try:
            return self.engine.count_tokens(messages, tools=tools) if tools else self.engine.count_tokens(messages)
        except PromptTooLong:
            raise
        except Exception as exc:
            raise _template_error(exc) from exc

    def for_messages(
        self, messages: list[ChatMessage], max_new_tokens: int, tools: Sequence[ToolSpec] | None = None
    ) -> tuple[list[ChatMessage], int]:
        """A stateless request's messages (a system message of its own replaces the configured one), and
        their token count (with ``tools``)."""
        system = [] if messages[0]["role"] == "system" else self.system_messages()
        count = functools.partial(self.count_tokens, tools=tools)
        return fit_to_budget(count, system, [], messages, self._budget(max_new_tokens))

    def for_turn(self, turn: Turn, max_new_tokens: int) -> tuple[list[ChatMessage], int]:
        """A session turn: the history before it (oldest turns dropped first) and its user message, and
        their token count."""
        budget = self._budget(max_new_tokens)
        return fit_to_budget(self.count_tokens, self.system_messages(), turn.history, plain([turn.user]), budget)

    def history_prompt(self, history: list[StoredMessage], max_new_tokens: int) -> str:
        """The prompt text a session's history renders to: the conversation as it stands, ending with the
        last reply (no opening of a next one); ``""`` for an empty conversation that the template refuses,
        as SmolLM2's does."""
        system = self.system_messages()
        if not system and not history:
            try:
                return self.engine.render_prompt([], add_generation_prompt=False)
            except Exception:
                return ""
        budget = self._budget(max_new_tokens)
        messages, _ = fit_to_budget(self.count_tokens, system, history, [], budget)
        return self.render(messages, add_generation_prompt=False)

    def render(
        self,
        messages: list[ChatMessage],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[ToolSpec] | None = None,
    ) -> str:
        """``messages`` (and ``tools``, where given) through the model's chat template."""
        try:
            if tools:
                return self.engine.render_prompt(messages, add_generation_prompt=add_generation_prompt, tools=tools)
            return self.engine.render_prompt(messages, add_generation_prompt=add_generation_prompt)
        except Exception as exc:
            raise _template_error(exc) from exc

    # -- off the event loop ---------------------------------------------------------------

    async def prepare_messages(
        self, messages: list[ChatMessage], max_new_tokens: int, tools: Sequence[ToolSpec] | None = None
    ) -> Prompt:
        """:meth:`for_messages`, rendered (``tools``: for the template to render, where given)."""

        def prepare() -> Prompt:
            fitted, tokens = self.for_messages(messages, max_new_tokens, tools)
            return Prompt(fitted, self.render(fitted, tools=tools), tokens)

        return await self.off_loop(prepare, heavy=bool(tools) or _chars(messages) > self.HEAVY_CHARS)

    async def prepare_turn(self, turn: Turn, max_new_tokens: int) -> Prompt:
        """:meth:`for_turn`, rendered; the user message gets its token count."""

        def prepare() -> Prompt:
            if "tokens" not in turn.user:
                turn.user["tokens"] = self.count_tokens(plain([turn.user]))
            fitted, tokens = self.for_turn(turn, max_new_tokens)
            return Prompt(fitted, self.render(fitted), tokens)

        return await self.off_loop(prepare, heavy=_chars([*turn.history, turn.user]) > self.HEAVY_CHARS)

    async def prepare_request(self, request: GenerationRequest) -> GenerationRequest:
        """``Engine.prepare(request)``: its prompt tokenized, in a worker thread of its own when it is long
        (tokenized in ``generate``, on the loop, a 2,000-token prompt held every stream 2-6 ms).

        Long is measured in UTF-8 bytes, which bound a byte-level tokenizer's tokens (a character of a
        dense script is several). The thread is not the one fitting prompts: an admitted request holds a
        slot, and must not wait behind the fitting of requests that have none yet."""
        prepare = functools.partial(self.engine.prepare, request)
        text = request.prompt if request.prompt is not None else "".join(m["content"] for m in request.messages)
        if len(text.encode("utf-8", "surrogatepass")) <= self.HEAVY_CHARS:
            return prepare()
        if self._admitted is None:
            self._admitted = anyio.CapacityLimiter(1)
        return await anyio.to_thread.run_sync(prepare, limiter=self._admitted)

    async def off_loop(self, fn: Callable[[], T], *, heavy: bool = True) -> T:
        """``fn()``, in the prompt-fitting worker thread when ``heavy``, else right here."""
        if not heavy:
            return fn()
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(1)  # one fitting at a time
        return await anyio.to_thread.run_sync(fn, limiter=self._limiter)


def _chars(messages: Iterable[ChatMessage | StoredMessage]) -> int:
    return sum(len(m["content"]) for m in messages)


def _template_error(exc: Exception) -> TemplateError:
    return TemplateError(f"the model's chat template cannot render this conversation ({type(exc).__name__}: {exc})")
