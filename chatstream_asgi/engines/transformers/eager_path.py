"""The growing cache's path (CPU by default): whole prompts prefilled together, one decode step a forward.

:class:`EagerPath` owns a :class:`~chatstream_asgi.engines.transformers.batch_cache.BatchKVCache` (rows
right-aligned on one time axis, grown as the batch needs), a
:class:`~chatstream_asgi.engines.transformers.prefix_cache.PrefixCache` (copies of finished rows' keys and
values in a bounded pool) and the model's eager forwards. A step decodes the running rows, then prefills
the new prompts (after any prefix they reuse) and appends them: two forwards when both are due, every
shape exact. Nothing is queued ahead: on a CPU the host waits for each forward anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from chatstream_asgi.engines.transformers.batch_cache import BatchKVCache
from chatstream_asgi.engines.transformers.model_runner import ModelRunner, past_layers
from chatstream_asgi.engines.transformers.output import fail
from chatstream_asgi.engines.transformers.planning import Chunk, StepPlan
from chatstream_asgi.engines.transformers.prefix_cache import PrefixCache
from chatstream_asgi.engines.transformers.sampling import BatchSampler
from chatstream_asgi.engines.transformers.sequence import EngineSequence, Outbox

__all__ = ["EagerPath"]

logger = logging.getLogger("chatstream_asgi.engine")

Forward = Callable[..., Any]


class EagerPath:
    """The growing cache with its prefix pool (see the module docstring).

    ``forward_step(input_ids, key_positions, positions)`` and ``forward_prefill(input_ids, key_positions,
    positions, past)`` are the engine's hooks around :meth:`run_step` and :meth:`run_prefill`.
    """

    runs_ahead = False

    def __init__(
        self,
        runner: ModelRunner,
        num_layers: int,
        max_rows: int,
        pad_id: int,
        prefix: PrefixCache | None,
        *,
        forward_step: Forward,
        forward_prefill: Forward,
    ) -> None:
        self._runner = runner
        self._kv = BatchKVCache(num_layers, row_capacity=max_rows)
        self._max_rows = max_rows
        self._pad_id = pad_id
        self.prefix = prefix
        self.reuses_prefixes = prefix is not None
        self._forward_step = forward_step
        self._forward_prefill = forward_prefill

    @property
    def rows(self) -> int:
        return self._max_rows

    @property
    def device(self) -> torch.device:
        return self._runner.model.device

    def start(self) -> None:
        """Nothing to allocate: the cache grows with the batch."""

    def plan(self, running: Sequence[EngineSequence], prefilling: Sequence[EngineSequence]) -> StepPlan:
        """Every running row, and every new prompt whole (after the prefix it reuses)."""
        chunks = []
        for seq in prefilling:
            if self.prefix is not None:
                seq.prefix, seq.reused = self.prefix.match(seq.prompt_ids)
            chunks.append(Chunk(seq, seq.reused, len(seq.prompt_ids) - seq.reused))
        return StepPlan(list(running), chunks)

    def launch(self, plan: StepPlan, sampler: BatchSampler, outbox: Outbox, *, fed: bool) -> Callable[[], list[int]]:
        tokens = self._decode(plan.decode, sampler) if plan.decode else []
        if plan.chunks:
            tokens += self._prefill([c.seq for c in plan.chunks], sampler, outbox)
        return lambda: tokens

    def run_step(self, input_ids: torch.Tensor, key_positions: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One decode forward over the batch cache; next-token logits ``[rows, vocab]``."""
        return self._runner.step(self._kv.as_transformers_cache(), input_ids, key_positions, positions)

    def run_prefill(self, *inputs: Any) -> Any:
        """The prompts' forward (:meth:`ModelRunner.prefill`)."""
        return self._runner.prefill(*inputs)

    def _decode(self, rows: list[EngineSequence], sampler: BatchSampler) -> list[int]:
        input_ids = torch.tensor([[s.last_token] for s in rows], dtype=torch.long, device=self.device)
        key_positions, positions = self._kv.prepare_step()
        logits = self._forward_step(input_ids, key_positions, positions)
        self._kv.finish_step()
        return sampler.sample(logits).tolist()

    def _prefill(self, seqs: list[EngineSequence], sampler: BatchSampler, outbox: Outbox) -> list[int]:
        """Run the prompts of ``seqs`` together, sample their first tokens, append them to the batch.

        Rows are left-padded twice: reused prefixes are right-aligned in the first ``past`` columns of
        the cache handed to the forward, new tokens in the ``width`` columns after them; every column's
        position (-1 in the gaps) tells the attention which keys each query sees. A failure fails these
        sequences only (the running rows' cache is untouched).
        """
        first_row = len(sampler)
        past = max(s.reused for s in seqs)
        width = max(len(s.prompt_ids) - s.reused for s in seqs)
        input_ids = torch.full((len(seqs), width), self._pad_id, dtype=torch.long)
        key_positions = torch.full((len(seqs), past + width), -1, dtype=torch.long)
        positions = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            new = seq.prompt_ids[seq.reused :]
            input_ids[row, width - len(new) :] = torch.tensor(new, dtype=torch.long)
            key_positions[row, past - seq.reused : past] = torch.arange(seq.reused)
            key_positions[row, past + width - len(new) :] = torch.arange(seq.reused, len(seq.prompt_ids))
            positions[row, width - len(new) :] = torch.arange(seq.reused, len(seq.prompt_ids))
        input_ids, key_positions, positions = (t.to(self.device) for t in (input_ids, key_positions, positions))
        try:
            logits, layers = self._forward_prefill(input_ids, key_positions, positions, past_layers(seqs, past))
            sampler.add_rows([s.params for s in seqs], [s.prompt_ids for s in seqs], [s.grammar for s in seqs])
            tokens = sampler.sample(logits, slice(first_row, first_row + len(seqs))).tolist()
            self._kv.add_rows(layers, key_positions)
        except Exception as exc:
            logger.exception("prefill of %d sequence(s) failed", len(seqs))
            sampler.keep_rows(range(min(first_row, len(sampler))))
            self._kv.keep_rows(range(min(first_row, self._kv.rows)))
            for seq in seqs:
                fail(seq, exc, outbox)
            return [0] * len(seqs)
        return tokens

    def retire(self, rows: Sequence[EngineSequence], order: Sequence[int]) -> None:
        """Copy leaving rows' keys and values into the prefix pool (not after a failure); compact the batch."""
        if self.prefix is not None:
            kept = set(order)
            for i, seq in enumerate(rows):
                if i not in kept:
                    self._retain(seq, i)
        self._kv.keep_rows(order)

    def _retain(self, seq: EngineSequence, row: int) -> None:
        assert self.prefix is not None
        if seq.finish == "error":
            return
        count, (keys, values) = self._kv.row_tokens(row), self._kv.copy_row(row)
        ids = [*seq.prompt_ids, *seq.output][:count]
        if len(ids) == count:
            self.prefix.insert(ids, keys, values, seq.session_key)

    def reset(self) -> None:
        self._kv.clear()

    def release(self, session_key: str) -> int:
        return self.prefix.release(session_key) if self.prefix is not None else 0

    @property
    def held_tokens(self) -> int:
        return self.prefix.tokens if self.prefix is not None else 0

    def usage(self, busy: int) -> float:
        """No budget to count against: the growing cache reports 0."""
        return 0.0
