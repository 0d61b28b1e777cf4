"""A session's conversation: messages with ids, regenerate, and fitting the prompt to the context.

History is a list of :data:`~chatstream_asgi.sessions.StoredMessage` (``{"id", "role",
"content"}``). A reply's id is the one sent in ``X-ChatStream-Last-Generated-ChatMessage-Id``. Only a
finished turn is stored: the user message together with its reply (whole, or partial when the
client left mid-stream).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from chatstream_asgi.engines.base import ChatMessage, Engine, PromptTooLong
from chatstream_asgi.protocols.chat import InvalidRequest
from chatstream_asgi.sessions.store import StoredMessage

__all__ = ["PromptBuilder", "Turn", "commit_turn", "fit_to_budget", "new_message", "plain", "start_turn"]


def new_message(role: str, content: str, message_id: str | None = None) -> StoredMessage:
    """A history message with a fresh id (or ``message_id``)."""
    return {"id": message_id or uuid.uuid4().hex, "role": role, "content": content}


def plain(messages: Iterable[StoredMessage]) -> list[ChatMessage]:
    """The messages as the engine takes them: role and content only."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


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


def commit_turn(history: Sequence[StoredMessage], turn: Turn, reply: StoredMessage) -> list[StoredMessage]:
    """``history`` (as stored now) with the turn's reply; a regenerated reply replaces the old one."""
    for i, message in enumerate(history):
        if message["id"] == turn.user["id"]:
            return [*history[: i + 1], reply]
    return [*history, turn.user, reply]


def fit_to_budget(
    count_tokens: Callable[[Sequence[ChatMessage]], int],
    system: Sequence[ChatMessage],
    history: Sequence[StoredMessage],
    tail: Sequence[ChatMessage],
    budget: int,
) -> list[ChatMessage]:
    """``system + history + tail``, dropping the oldest turns of ``history`` until it fits ``budget``
    tokens. Raises :class:`InvalidRequest` when even ``system + tail`` does not fit.

    Dropping turns only shortens the prompt, so the first start that fits is found by bisection:
    a long history costs O(log turns) token counts, not one per turn.
    """

    def build(start: int) -> list[ChatMessage]:
        return [*system, *plain(history[start:]), *tail]

    def fits(start: int) -> tuple[bool, int]:
        try:
            used = count_tokens(build(start))
        except PromptTooLong as exc:
            raise InvalidRequest(str(exc)) from None
        return used <= budget, used

    # Where a turn may start: the beginning, each later user message, or nothing kept.
    starts = [0, *(i for i, m in enumerate(history) if m["role"] == "user" and i > 0), len(history)]
    ok, used = fits(starts[-1])
    if not ok:
        raise InvalidRequest(f"the prompt has {used} tokens; at most {budget} fit")
    lo, hi = 0, len(starts) - 1  # starts[hi] fits; find the smallest index that does
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(starts[mid])[0]:
            hi = mid
        else:
            lo = mid + 1
    return build(starts[hi])


class PromptBuilder:
    """Fits conversations into the engine's context: system prompt first, then as many of the most
    recent turns as leave room for ``max_new_tokens``."""

    def __init__(self, engine: Engine, system_prompt: str | None) -> None:
        self.engine = engine
        self.system_prompt = system_prompt

    def system_messages(self) -> list[ChatMessage]:
        """The configured system prompt as a message list (empty without one)."""
        return [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []

    def _budget(self, max_new_tokens: int) -> int:
        return self.engine.context_len - max_new_tokens

    def for_messages(self, messages: list[ChatMessage], max_new_tokens: int) -> list[ChatMessage]:
        """A stateless request's messages; a system message of its own replaces the configured one."""
        system = [] if messages[0]["role"] == "system" else self.system_messages()
        return fit_to_budget(self.engine.count_tokens, system, [], messages, self._budget(max_new_tokens))

    def for_turn(self, turn: Turn, max_new_tokens: int) -> list[ChatMessage]:
        """A session turn: the history before it (oldest turns dropped first) and its user message."""
        budget = self._budget(max_new_tokens)
        return fit_to_budget(self.engine.count_tokens, self.system_messages(), turn.history, plain([turn.user]), budget)

    def history_prompt(self, history: list[StoredMessage], max_new_tokens: int) -> str:
        """The prompt text a session's history renders to, as the next reply would continue it."""
        budget = self._budget(max_new_tokens)
        return self.render(fit_to_budget(self.engine.count_tokens, self.system_messages(), history, [], budget))

    def render(self, messages: list[ChatMessage]) -> str:
        """``messages`` through the model's chat template."""
        return self.engine.render_prompt(messages)
