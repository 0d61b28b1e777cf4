"""One request's state inside the engine, and the hand-off of its output to the event loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from chatstream_asgi.engines.base import FinishReason, GenerationParams, QueueStream
from chatstream_asgi.engines.transformers.detokenizer import IncrementalDetokenizer, StopMatcher
from chatstream_asgi.engines.transformers.grammar import RowGrammar
from chatstream_asgi.engines.transformers.prefix_cache import PrefixEntry
from chatstream_asgi.engines.transformers.session_turns import SessionTurns

__all__ = ["EngineSequence", "Outbox"]

logger = logging.getLogger("chatstream_asgi.engine")


@dataclass(eq=False)
class EngineSequence:
    """One request's state inside the engine (owned by the generation thread once admitted)."""

    stream: QueueStream
    prompt_ids: list[int]
    params: GenerationParams
    ignore_eos: bool
    detokenizer: IncrementalDetokenizer
    stop: StopMatcher
    generated: int = 0
    last_token: int = 0
    finish: FinishReason | None = None
    cached: int = 0  # tokens in the slotted cache (static path)
    slot: int = -1  # the slot holding them (static path)
    started: bool = False  # its first prompt chunk has been run (its reused and prefilled tokens counted)
    session_key: str | None = None
    turns: SessionTurns | None = None  # where the conversation's ids are kept for its next turn, at the finish
    prompt_text: str = ""  # the rendered prompt, kept with them
    output: list[int] = field(default_factory=list)  # generated ids, kept for the prefix cache
    reused: int = 0  # leading prompt tokens whose keys and values come from the prefix cache
    prefix: PrefixEntry | None = None  # where they come from, until copied into the batch
    grammar: RowGrammar | None = None  # the matcher of a reply constrained to a schema

    @property
    def watched(self) -> bool:
        """Whether each token must be read before the next is picked: a grammar advances on it, or the
        reply reports log-probabilities (the sampler keeps only its last step's)."""
        return self.grammar is not None or self.params.logprobs is not None


class Outbox:
    """Producer calls collected during one step, delivered with one wake-up per event loop.

    Ends (``final=True``: finish, fail) may be held back by ``flush(hold_ends=True)`` until the
    next plain flush: the engine retires a finished row (keeps its keys and values for prefix
    reuse) before its consumer learns that it ended, so a ``release_session`` that follows a
    finished turn always finds what that turn kept.
    """

    def __init__(self) -> None:
        self._calls: dict[asyncio.AbstractEventLoop, list[tuple[Callable[..., None], tuple, dict]]] = {}
        self._ends: list[tuple[QueueStream, Callable[..., None], tuple, dict]] = []

    def add(self, stream: QueueStream, fn: Callable[..., None], *args: Any, final: bool = False, **kwargs: Any) -> None:
        if final:
            self._ends.append((stream, fn, args, kwargs))
        else:
            self._calls.setdefault(stream.loop, []).append((fn, args, kwargs))

    def flush(self, *, hold_ends: bool = False) -> None:
        if not hold_ends:
            for stream, fn, args, kwargs in self._ends:
                self._calls.setdefault(stream.loop, []).append((fn, args, kwargs))
            self._ends = []
        calls, self._calls = self._calls, {}
        for loop, items in calls.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
                logger.debug("dropped %d deliveries for a closed event loop", len(items))


def _deliver(items: list[tuple[Callable[..., None], tuple, dict]]) -> None:
    for fn, args, kwargs in items:
        fn(*args, **kwargs)
