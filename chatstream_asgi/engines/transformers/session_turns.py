"""A conversation's last token ids, so that its next prompt is built from them rather than re-tokenized.

Re-tokenizing a reply's text does not always give back the ids that were generated (BPE merges
differently at the boundaries), and a prompt that differs in one early token reuses nothing after it.
:class:`SessionTurns` keeps, per conversation (``GenerationRequest.session_key``), the last sequence's
rendered prompt text and exact ids plus its generated ids. When the next prompt of that conversation
renders to text that starts with the stored prompt text followed by the longest part of the reply it
repeats verbatim, its ids are the stored ones plus the tokenization of the rest; otherwise (a changed
history, another template rendering) it is tokenized as usual. The engine does this whether or not
prefix reuse is on, so greedy output with reuse is the output without it.

Memory: one entry per conversation, its ids packed 8 bytes each (plus the prompt's text); the least
recently used conversations are dropped while more than ``max_tokens`` ids are kept in all
(default 4M: about 32 MB of ids). :meth:`SessionTurns.release` forgets one (its context was cleared).
"""

from __future__ import annotations

import threading
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["SessionTurns"]


@dataclass(frozen=True)
class _Turn:
    prompt_text: str
    prompt_ids: array
    output_ids: array

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


class SessionTurns:
    """The last turn's ids of conversations, up to ``max_tokens`` ids in all (see the module docstring)."""

    def __init__(self, tokenizer: Any, max_tokens: int = 4 << 20) -> None:
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.tokens = 0
        self._turns: OrderedDict[str, _Turn] = OrderedDict()
        self._lock = threading.Lock()  # encode() and release() on the event loop, record() on the engine thread

    def __len__(self) -> int:
        return len(self._turns)

    def tokenize(self, text: str) -> list[int]:
        """Plain tokenization (no special tokens added)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(self, text: str, session_key: str | None, limit: int | None = None) -> list[int]:
        """The ids of prompt ``text``: the session's last ids where ``text`` continues them, else tokenized.

        Built ids longer than ``limit`` (where the plain tokenization may still fit) give way to it.
        """
        with self._lock:
            turn = self._turns.get(session_key) if session_key else None
        if turn is None or not text.startswith(turn.prompt_text):
            return self.tokenize(text)
        rest = text[len(turn.prompt_text) :]
        count, said = self._repeated(list(turn.output_ids), rest)
        tail = rest[len(said) :]
        tail_ids = self.tokenize(tail) if tail else []
        if tail_ids and self._decode(tail_ids) != tail:  # a tokenizer that adds a prefix space: not splittable
            return self.tokenize(text)
        ids = [*turn.prompt_ids, *turn.output_ids[:count], *tail_ids]
        return ids if limit is None or len(ids) <= limit else self.tokenize(text)

    def record(
        self, session_key: str | None, prompt_text: str, prompt_ids: Sequence[int], output_ids: Sequence[int]
    ) -> None:
        """Remember the conversation's latest sequence (its prompt text and ids, its generated ids)."""
        if not session_key:
            return
        turn = _Turn(prompt_text, array("q", prompt_ids), array("q", output_ids))
        with self._lock:
            self._forget(session_key)
            self._turns[session_key] = turn
            self.tokens += len(turn)
            while self.tokens > self.max_tokens:
                self._forget(next(iter(self._turns)))

    def release(self, session_key: str) -> bool:
        """Forget the conversation; True if it was held."""
        with self._lock:
            return self._forget(session_key)

    def _forget(self, session_key: str) -> bool:
        turn = self._turns.pop(session_key, None)
        self.tokens -= len(turn) if turn is not None else 0
        return turn is not None

    def _repeated(self, output_ids: list[int], rest: str) -> tuple[int, str]:
        """The most leading generated ids whose text ``rest`` starts with, and that text."""
        whole = self._decode(output_ids)
        if rest.startswith(whole):
            return len(output_ids), whole
        low, high, said = 0, len(output_ids), ""  # rest starts with ids[:low]'s text, not with ids[:high]'s
        while high - low > 1:
            middle = (low + high) // 2
            text = self._decode(output_ids[:middle])
            if rest.startswith(text):
                low, said = middle, text
            else:
                high = middle
        return low, said

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)
