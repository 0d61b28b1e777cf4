"""What goes into a step beside the running rows, and which slots it takes: plain Python, no torch.

A step runs the running rows' next tokens (each row its own slot, ``[0, n)``) and, packed after them,
a chunk of prompt tokens (:func:`pack_chunk`): the oldest prompts first, each from where its cached
tokens end (a reused beginning, earlier chunks), while the step's token budget lasts and the chunk fits a
shape the runner has (:meth:`~chatstream_asgi.engines.transformers.step_runner.StepRunner.fits`). A
prompt the budget cuts short ends the chunk, so at most one prompt is ever partly prefilled. Prompts the
chunk completes join the running rows at the next slots (:func:`slot_targets`); the partial one waits in
the top slot.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Chunk", "StepPlan", "pack_chunk", "slot_targets"]


@dataclass(eq=False)
class Chunk:
    """``take`` prompt tokens of ``seq`` from token ``start`` on (those before it are in the cache)."""

    seq: Any  # an EngineSequence: anything with ``prompt_ids``
    start: int
    take: int

    @property
    def end(self) -> int:
        return self.start + self.take

    @property
    def completes(self) -> bool:
        """Whether this chunk ends the prompt (its last token's logits give the first generated token)."""
        return self.end == len(self.seq.prompt_ids)


@dataclass(eq=False)
class StepPlan:
    """One step: a token for each of ``decode`` (the running rows, in row order), and ``chunks``."""

    decode: list[Any]
    chunks: list[Chunk] = field(default_factory=list)

    @property
    def completed(self) -> list[Any]:
        """The sequences whose prompt this step completes, in chunk order (they get a first token)."""
        return [c.seq for c in self.chunks if c.completes]

    @property
    def sampled(self) -> list[Any]:
        """The sequences this step samples a token for: the decode rows, then the completed prompts."""
        return [*self.decode, *self.completed]


def pack_chunk(
    prefilling: Sequence[Any],
    *,
    budget: int,
    per_sequence: int,
    cached: Callable[[Any], int],
    fits: Callable[[int, int, int], bool],
) -> list[Chunk]:
    """The chunk of a step: prompts of ``prefilling`` (oldest first) packed while they fit.

    ``cached(seq)`` is how many of its prompt tokens are in the cache (for a new prompt: a held prefix it
    could reuse); each prompt takes what is left of ``budget`` tokens, at most ``per_sequence``, and the
    chunk grows while ``fits(tokens, columns, sequences)`` (``columns``: the keys it reads, each prompt's
    cached and new tokens). A prompt cut short ends the chunk. The first prompt goes in even when nothing
    fits (it then runs in a shape that is not captured).
    """
    chunks: list[Chunk] = []
    tokens = columns = 0
    for seq in prefilling:
        start = cached(seq)
        take = min(len(seq.prompt_ids) - start, per_sequence, budget - tokens)
        if take <= 0 or (chunks and not fits(tokens + take, columns + start + take, len(chunks) + 1)):
            break
        chunks.append(Chunk(seq, start, take))
        tokens, columns = tokens + take, columns + start + take
        if not chunks[-1].completes:
            break
    return chunks


def slot_targets(chunks: Sequence[Chunk], running: int, rows: int) -> list[int]:
    """Each chunk's slot: completed prompts join the running rows at ``running, running + 1, ...``; a
    partly prefilled one (only ever the last) waits in the top slot ``rows - 1``."""
    targets, joining = [], running
    for chunk in chunks:
        if chunk.completes:
            targets.append(joining)
            joining += 1
        else:
            targets.append(rows - 1)
    return targets
