"""Prefix reuse: the keys and values of finished sequences, kept so that a prompt beginning with them skips them.

A chat's next turn starts with everything its last turn saw (system prompt, history, the reply); many
conversations start with the same system prompt. When a sequence leaves the batch, the engine hands its
token ids and their per-layer keys and values to :class:`PrefixCache`; a later prompt is matched against
the held entries **by token ids** (the longest common prefix over all entries), so a prompt that shares
only a beginning with an entry (a shared system prompt, a regenerated or truncated history) reuses that
beginning, and a changed history simply misses: nothing is keyed by session, nothing stale is served.

Memory: entries are copies, held on the engine's device, at most ``capacity`` tokens in all; the least
recently used entries are evicted first. A new entry whose ids extend an held one replaces it (a
conversation keeps one entry, its latest turn). Entries remember the session keys that produced them, so
:meth:`PrefixCache.release` can free what a cleared conversation held. Matching scans the entries with a
vectorised comparison (their number is small: capacity over conversation length).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor

from chatstream_asgi.engines.transformers.kv_layout import KVLayout, UnsupportedModel

__all__ = ["PrefixCache", "PrefixEntry", "absorb", "longest_match", "prefix_cache_for", "release_owner"]

logger = logging.getLogger("chatstream_asgi.engine")


class _HasIds(Protocol):
    ids: Tensor


_Held = TypeVar("_Held", bound=_HasIds)


@dataclass(eq=False)
class PrefixEntry:
    """Token ids and, per layer, their keys and values ``[kv_heads, len(ids), head_dim]``."""

    ids: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    owners: set[str] = field(default_factory=set)

    def __len__(self) -> int:
        return len(self.ids)


class PrefixCache:
    """An LRU store of prefix entries holding at most ``capacity`` tokens (see the module docstring)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.tokens = 0
        self._entries: OrderedDict[int, PrefixEntry] = OrderedDict()
        self._lock = threading.Lock()  # release() comes from the event loop, the rest from the engine thread

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, ids: Sequence[int]) -> tuple[PrefixEntry | None, int]:
        """The entry sharing the longest beginning with ``ids`` and that length (at most ``len(ids) - 1``).

        One token is always left to prefill: the prompt's last position gives the first token's logits.
        """
        query = torch.tensor(ids, dtype=torch.long)
        with self._lock:
            return self._match(query)

    def _match(self, query: torch.Tensor) -> tuple[PrefixEntry | None, int]:
        best, best_len = longest_match(self._entries.values(), query)
        if best is not None:
            self._entries.move_to_end(id(best))
        return best, best_len

    def insert(self, ids: Sequence[int], keys: list[Tensor], values: list[Tensor], owner: str | None) -> None:
        """Hold ``ids`` with their keys and values (copies the caller gives up), evicting LRU entries to fit."""
        if not ids or len(ids) > self.capacity:
            return
        with self._lock:
            self._insert(torch.tensor(ids, dtype=torch.long), keys, values, owner)

    def _insert(self, new: Tensor, keys: list[Tensor], values: list[Tensor], owner: str | None) -> None:
        owners = absorb(self._entries, new, owner, self._drop)
        if owners is None:  # already held (a turn cancelled early, a repeated prompt)
            return
        entry = PrefixEntry(new, keys, values, owners)
        self._entries[id(entry)] = entry
        self.tokens += len(entry)
        while self.tokens > self.capacity:
            self._drop(next(iter(self._entries)))

    def release(self, owner: str) -> int:
        """Forget ``owner``; drop the entries no other session produced. Returns the tokens freed."""
        with self._lock:
            return release_owner(self._entries, owner, self._drop)

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._entries.clear()
            self.tokens = 0

    def _drop(self, key: int) -> None:
        self.tokens -= len(self._entries.pop(key))


def longest_match(entries: Iterable[_Held], query: Tensor) -> tuple[_Held | None, int]:
    """The entry whose ``ids`` share the longest beginning with ``query``, and its length (at most ``len(query) - 1``:
    the prompt's last position gives the first token's logits, so one token is always left to prefill)."""
    best, best_len = None, 0
    for entry in entries:
        n = min(len(entry.ids), len(query) - 1)
        if n <= best_len:
            continue
        differ = (entry.ids[:n] != query[:n]).nonzero()
        common = int(differ[0]) if len(differ) else n
        if common > best_len:
            best, best_len = entry, common
    return best, best_len


class _Owned(_HasIds, Protocol):
    owners: set[str]

    def __len__(self) -> int: ...


_Entry = TypeVar("_Entry", bound=_Owned)


def absorb(
    entries: OrderedDict[int, _Entry], new: Tensor, owner: str | None, drop: Callable[[int], object]
) -> set[str] | None:
    """Make room in ``entries`` for an entry of ids ``new`` produced by ``owner``.

    None when an entry already holds all of ``new`` (it gains the owner and becomes the most recently
    used); else the owners the new entry takes over from the entries it extends (a conversation's
    earlier turns), which are dropped with ``drop(key)``.
    """
    owners = {owner} if owner else set()
    for key, entry in list(entries.items()):
        n = min(len(entry), len(new))
        if not torch.equal(entry.ids[:n], new[:n]):
            continue
        if len(entry) >= len(new):
            entry.owners |= owners
            entries.move_to_end(key)
            return None
        owners |= entry.owners
        drop(key)
    return owners


def release_owner(entries: OrderedDict[int, _Entry], owner: str, drop: Callable[[int], object]) -> int:
    """Forget ``owner`` in ``entries``; drop (``drop(key)``) those no other session produced. Returns their tokens."""
    freed = 0
    for key, entry in list(entries.items()):
        if owner in entry.owners:
            entry.owners.discard(owner)
            if not entry.owners:
                freed += len(entry)
                drop(key)
    return freed


def prefix_cache_for(config: Any, dtype: torch.dtype, memory_gib: float) -> PrefixCache | None:
    """A prefix cache of ``memory_gib`` for a model of ``config``; None (logged) for one it cannot hold."""
    try:
        layout = KVLayout.of(config, dtype)
    except UnsupportedModel as exc:
        logger.warning("prefix cache off: %s", exc)
        return None
    return PrefixCache(int(memory_gib * 2**30) // layout.bytes_per_token)
