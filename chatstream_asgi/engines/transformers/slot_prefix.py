"""Prefix reuse on the static cache: finished sequences' keys and values kept in the free slots themselves.

The static cache (:class:`~chatstream_asgi.engines.transformers.static_cache.StaticKVCache`) is sized
from the engine's KV budget. Running rows occupy slots ``[0, n)``; a partly prefilled prompt the top
slot. Every other slot is free, and when a row leaves the batch its slot keeps its keys and values
where they are: :class:`SlotPrefixIndex` records it as a retained entry (the token ids its first
columns hold, the sessions that produced it, least recently used first). Retention therefore costs no
memory beyond the slots, and it never delays admission: the engine admits as if no slot were retained,
and whenever a running or prefilling sequence needs a slot that holds an entry, the entry moves to a
free slot, or, when none is free, the least recently used entry is evicted (its slot simply reused).

A new prompt is matched against the entries by token ids (longest common beginning, as
:class:`~chatstream_asgi.engines.transformers.prefix_cache.PrefixCache` does on the eager path). A
prompt that extends a whole entry (a conversation's next turn) takes that slot's keys and values over:
the entry ends, and the slot is used in place when it is the sequence's target, else its columns are
moved there. A prompt that shares only a beginning (a system prompt) gets a copy of those columns and
the entry stays.

On a model whose sliding layers keep rings (a window shorter than the context), a slot holds only the last
ring's worth of those layers' keys, and writing a new turn after a shared beginning would leave the ring's
later columns behind it: there an entry is reused only whole (``whole_entries``), which is the case that
pays most, a conversation's next turn. A shared system prompt, a regenerated last turn, misses.

Every move is planned here and returned as ``(src, dst, tokens)`` that the caller applies in one
gather/scatter (:meth:`StaticKVCache.move_slots`), so chains and swaps of slots are safe.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from chatstream_asgi.engines.transformers.prefix_cache import absorb, longest_match, release_owner

__all__ = ["SlotEntry", "SlotPrefixIndex"]


@dataclass(eq=False)
class SlotEntry:
    """A retained slot: its first ``len(ids)`` columns hold the keys and values of ``ids``."""

    slot: int
    ids: torch.Tensor
    owners: set[str] = field(default_factory=set)

    def __len__(self) -> int:
        return len(self.ids)


class SlotPrefixIndex:
    """The retained entries of a static cache's free slots (see the module docstring); hits of at least
    ``min_tokens``, and only of a whole entry with ``whole_entries``.

    Every method but :meth:`release` runs on the generation thread; a lock orders them with it.
    """

    def __init__(self, min_tokens: int = 16, *, whole_entries: bool = False) -> None:
        self.min_tokens = min_tokens
        self.whole_entries = whole_entries
        self._entries: OrderedDict[int, SlotEntry] = OrderedDict()  # by slot, least recently used first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def tokens(self) -> int:
        """Tokens whose keys and values the retained slots hold."""
        with self._lock:
            return sum(len(e) for e in self._entries.values())

    def held(self) -> dict[int, tuple[int, set[str]]]:
        """Each retained slot's token count and owners, least recently used first."""
        with self._lock:
            return {slot: (len(e), set(e.owners)) for slot, e in self._entries.items()}

    def match(self, ids: Sequence[int]) -> tuple[SlotEntry | None, int]:
        """The entry sharing the longest beginning with ``ids`` and its length (at most ``len(ids) - 1``).

        A beginning shorter than ``min_tokens`` (the chat template's first tokens) is no hit: a hit's
        columns are moved, which such a match does not pay for. Looking up changes
        nothing: :meth:`claim` commits a match the engine acts on.
        """
        query = torch.tensor(ids, dtype=torch.long)
        with self._lock:
            entries = self._entries.values()
            if self.whole_entries:
                entries = [e for e in entries if len(e) < len(ids) and torch.equal(e.ids, query[: len(e)])]
            best, best_len = longest_match(entries, query)
        return (best, best_len) if best_len >= self.min_tokens else (None, 0)

    def claim(self, entry: SlotEntry, common: int) -> bool:
        """Commit a match: a whole entry is taken over (it ends; True), a shared beginning is copied (False).

        Also False when the entry was released meanwhile: its columns are still intact this step.
        """
        with self._lock:
            if self._entries.get(entry.slot) is not entry:
                return False
            if common >= len(entry):
                del self._entries[entry.slot]
                return True
            self._entries.move_to_end(entry.slot)
            return False

    def make_room(self, rows: int, busy: int, targets: Iterable[int]) -> list[tuple[int, int, int]]:
        """Free ``targets`` for sequences, leaving slots ``[0, busy)`` (running rows) alone.

        Entries on a target move to a free slot, most recently used first; where none is left the
        least recently used entries are evicted. Returns the moves ``(src, dst, tokens)``.
        """
        targets = set(targets)
        with self._lock:
            room = rows - busy - len(targets - set(range(busy)))
            while len(self._entries) > max(room, 0):
                self._entries.popitem(last=False)
            free = sorted(set(range(busy, rows)) - targets - set(self._entries))
            moves = []
            for entry in reversed(list(self._entries.values())):
                if entry.slot in targets:
                    dst = free.pop(0)
                    moves.append((entry.slot, dst, len(entry)))
                    entry.slot = dst
            self._entries = OrderedDict((e.slot, e) for e in self._entries.values())
            return moves

    def retain(self, slot: int, ids: Sequence[int], owner: str | None) -> bool:
        """Keep ``slot`` (holding ``ids``) as an entry; False when an entry already holds all of ``ids``.

        An entry whose ids the new one extends (a conversation's earlier turn) ends: its slot is free.
        """
        if not ids:
            return False
        new = torch.tensor(ids, dtype=torch.long)
        with self._lock:
            owners = absorb(self._entries, new, owner, self._entries.pop)
            if owners is None:
                return False
            self._entries[slot] = SlotEntry(slot, new, owners)
            return True

    def release(self, owner: str) -> int:
        """Forget ``owner``; free the slots no other session produced. Returns the tokens freed."""
        with self._lock:
            return release_owner(self._entries, owner, self._entries.pop)

    def clear(self) -> None:
        """Forget every entry (the cache's contents are unknown, or the engine stopped)."""
        with self._lock:
            self._entries.clear()
