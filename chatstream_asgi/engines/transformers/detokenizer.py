"""Incremental detokenization and stop-string hold-back.

:class:`IncrementalDetokenizer` turns a growing list of token ids into text deltas without ever
emitting a broken multi-byte character: byte-level BPE splits one character over several tokens,
and decoding those one at a time yields U+FFFD. It decodes only a short window of recent tokens,
so each step costs O(1) regardless of the output length; :func:`decode_windows` decodes the
windows of a whole batch in one tokenizer call.

:class:`StopMatcher` never lets any part of a stop string out: text that could be the start of a
stop string is held back until it either completes the stop string (the text before it is
emitted and generation ends) or can no longer match (it is released).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["IncrementalDetokenizer", "StopMatcher", "decode_windows"]

_REPLACEMENT = "\ufffd"
_CONTEXT_TOKENS = 5
# A UTF-8 character spans at most 4 bytes; past this many pending tokens U+FFFD is real output.
_MAX_PENDING = 8


class IncrementalDetokenizer:
    """Text deltas for one sequence's generated tokens.

    The window starts with a few prompt tokens so that tokenizers which drop a leading space
    when decoding a lone token (SentencePiece) still produce the right first delta. Use
    :meth:`windows` / :meth:`advance` for batched decoding, or :meth:`step` for one sequence.
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)

    def windows(self) -> tuple[list[int], list[int]]:
        """The token windows to decode: (already emitted context, context plus new tokens)."""
        return self.tokens[self.prefix_offset : self.read_offset], self.tokens[self.prefix_offset :]

    def advance(self, prefix_text: str, full_text: str, *, final: bool = False) -> str:
        """Given the decoded :meth:`windows`, return the new text (``""`` while a character is incomplete)."""
        pending = len(self.tokens) - self.read_offset
        if full_text.endswith(_REPLACEMENT) and not final and pending < _MAX_PENDING:
            return ""
        if len(full_text) <= len(prefix_text):
            # Tokens without text (skipped special tokens): nothing to emit, nothing to wait for.
            self.read_offset = len(self.tokens)
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.tokens)
        return full_text[len(prefix_text) :]

    def step(self, token_id: int) -> str:
        """Add one token and return the text it completes."""
        self.tokens.append(token_id)
        prefix, full = self.windows()
        return self.advance(*decode_windows(self.tokenizer, [prefix, full]))

    def flush(self) -> str:
        """Text still held back at the end of generation (may contain U+FFFD for invalid bytes)."""
        prefix, full = self.windows()
        return self.advance(*decode_windows(self.tokenizer, [prefix, full]), final=True)


def decode_windows(tokenizer: Any, windows: Sequence[Sequence[int]]) -> list[str]:
    """Decode many token windows with one tokenizer call (skipping special tokens)."""
    if not windows:
        return []
    return list(tokenizer.batch_decode([list(w) for w in windows], skip_special_tokens=True))


class StopMatcher:
    """Hold back text that might start a stop string; report when one completes."""

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = tuple(s for s in stop if s)
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Take a text delta and return what can safely be emitted now.

        After a stop string completes, :attr:`stopped` is true and the return value is the text
        before it; further input is ignored. Work per call is bounded by the delta and the stop
        strings' lengths, never by the length of the output so far.
        """
        if self.stopped:
            return ""
        if not self.stop:
            return text
        buffer = self._held + text
        cut = min((i for i in (buffer.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return buffer[:cut]
        hold = self._partial_suffix(buffer)
        self._held = buffer[len(buffer) - hold :] if hold else ""
        return buffer[: len(buffer) - hold]

    def flush(self) -> str:
        """Release held text at the end of generation (no stop string completed)."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _partial_suffix(self, buffer: str) -> int:
        """Length of the longest suffix of ``buffer`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(buffer)), best, -1):
                if buffer.endswith(s[:n]):
                    best = n
                    break
        return best
