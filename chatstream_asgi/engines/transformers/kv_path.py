"""The seam between the engine's loop and a cache design: what the loop asks of a KV path.

:class:`~chatstream_asgi.engines.transformers.engine.TransformersEngine`'s generation thread runs
schedule, one forward, sample, output, and holds one KV path for the forward: the growing cache
(:class:`~chatstream_asgi.engines.transformers.eager_path.EagerPath`, CPU) or the slotted cache
(:class:`~chatstream_asgi.engines.transformers.static_path.StaticPath`, CUDA graphs). Each path owns its
cache, its prefix index and its runners; the loop owns the sequences (running rows, prompts being
prefilled), the sampler and the output. A new cache design is a new path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from chatstream_asgi.engines.transformers.planning import StepPlan
from chatstream_asgi.engines.transformers.sampling import BatchSampler
from chatstream_asgi.engines.transformers.sequence import EngineSequence, Outbox

__all__ = ["KVPath"]


class KVPath(Protocol):
    """A cache design with its prefix index and runners (see the module docstring).

    Row ``i`` of the running batch is the sampler's row ``i`` and, on the slotted cache, slot ``i``.
    """

    runs_ahead: bool
    """Whether :meth:`launch` only queues work: then the loop queues the next step before reading this one."""

    reuses_prefixes: bool
    """Whether finished sequences' keys and values are kept for prompts that begin with them."""

    @property
    def rows(self) -> int:
        """How many sequences may run or be prefilled at once (known after :meth:`start`)."""

    def start(self) -> None:
        """Allocate the cache, capture graphs (on the generation thread; idempotent)."""

    def plan(self, running: Sequence[EngineSequence], prefilling: Sequence[EngineSequence]) -> StepPlan:
        """This step: a token for every running row and which prompt tokens go with them."""

    def launch(self, plan: StepPlan, sampler: BatchSampler, outbox: Outbox, *, fed: bool) -> Callable[[], list[int]]:
        """Run ``plan``'s forward and sample; the call returned gives one token per ``plan.sampled`` sequence
        still unfinished (prompts whose forward failed are failed here, into ``outbox``).

        ``fed``: the decode rows' input tokens are the previous launch's samples, left on the device.
        Raises when the running rows' cache state is lost (the loop fails them all and calls :meth:`reset`).
        """

    def run_step(self, first: torch.Tensor, *args: Any) -> Any:
        """The forward of a step with decode rows (``first``: one row per running sequence); the engine's
        ``_forward_step`` calls it, and every such forward goes through that hook."""

    def run_prefill(self, *args: Any) -> Any:
        """The forward of prompts alone (through the engine's ``_forward_prefill`` hook)."""

    def retire(self, rows: Sequence[EngineSequence], order: Sequence[int]) -> None:
        """Rows left the batch: row ``order[j]`` becomes row ``j``; keep what leaving rows computed for reuse.
        Where the path queues, a step may be queued and not yet read: what this moves follows it."""

    def reset(self) -> None:
        """Forget every row and every kept prefix (after a failure, or at shutdown)."""

    def release(self, session_key: str) -> int:
        """Free what ``session_key`` alone left for reuse; the KV tokens freed (any thread)."""

    @property
    def held_tokens(self) -> int:
        """Tokens whose keys and values are kept for reuse now."""

    def usage(self, busy: int) -> float:
        """The share of the cache that ``busy`` running and prefilling sequences hold (0 without a budget)."""
