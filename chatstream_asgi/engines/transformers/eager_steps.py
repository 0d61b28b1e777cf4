"""The CPU path's steps over the growing batch cache: batched prefill of new prompts, one decode step.

:class:`EagerSteps` is a part of :class:`~chatstream_asgi.engines.transformers.engine.TransformersEngine`
kept in its own module: its methods run on the generation thread, over the engine's batch cache,
sampler and rows.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from chatstream_asgi.engines.transformers.model_runner import past_layers
from chatstream_asgi.engines.transformers.output import fail
from chatstream_asgi.engines.transformers.sequence import EngineSequence, Outbox

if TYPE_CHECKING:
    from chatstream_asgi.engines.transformers.batch_cache import BatchKVCache
    from chatstream_asgi.engines.transformers.output import OutputProcessor
    from chatstream_asgi.engines.transformers.prefix_cache import PrefixCache
    from chatstream_asgi.engines.transformers.sampling import BatchSampler

__all__ = ["EagerSteps"]

logger = logging.getLogger("chatstream_asgi.engine")


class EagerSteps:
    """The batch-cache steps of the engine (see the module docstring)."""

    device: torch.device
    _kv: BatchKVCache
    _sampler: BatchSampler | None
    _output: OutputProcessor
    _active: list[EngineSequence]
    _pad_id: int
    _prefix: PrefixCache | None

    def _match_prefix(self, seq: EngineSequence) -> None:
        """Look ``seq``'s prompt up in the prefix cache; count reused and prefilled tokens."""
        if self._prefix is not None:
            seq.prefix, seq.reused = self._prefix.match(seq.prompt_ids)
        self._count_prompt(seq)

    def _prefill(self, seqs: list[EngineSequence], outbox: Outbox) -> None:
        """Run the prompts of ``seqs`` together, sample their first tokens, merge them into the batch.

        Rows are left-padded twice: reused prefixes are right-aligned in the first ``past`` columns of
        the cache handed to the forward, new tokens in the ``width`` columns after them; the mask
        leaves out the gaps, and position ids continue each row's prefix.
        """
        first_row = len(self._active)
        past = max(s.reused for s in seqs)
        width = max(len(s.prompt_ids) - s.reused for s in seqs)
        input_ids = torch.full((len(seqs), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), past + width), dtype=torch.long)
        positions = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            new = seq.prompt_ids[seq.reused :]
            input_ids[row, width - len(new) :] = torch.tensor(new, dtype=torch.long)
            mask[row, past - seq.reused : past] = 1
            mask[row, past + width - len(new) :] = 1
            positions[row, width - len(new) :] = torch.arange(seq.reused, len(seq.prompt_ids))
        input_ids, mask, positions = input_ids.to(self.device), mask.to(self.device), positions.to(self.device)
        try:
            logits, layers = self._forward_prefill(input_ids, mask, positions, past_layers(seqs, past))
            sampler = self._get_sampler(logits.shape[-1])
            sampler.add_rows([s.params for s in seqs], [s.prompt_ids for s in seqs])
            tokens = sampler.sample(logits, slice(first_row, first_row + len(seqs)))
            self._kv.add_rows(layers, mask)
        except Exception as exc:
            logger.exception("prefill of %d sequence(s) failed", len(seqs))
            if self._sampler is not None:
                self._sampler.keep_rows(range(min(first_row, len(self._sampler))))
            self._kv.keep_rows(range(min(first_row, self._kv.rows)))
            for seq in seqs:
                fail(seq, exc, outbox)
            return
        self._active.extend(seqs)
        self._output.accept(seqs, tokens.tolist(), outbox)

    def _decode_step(self, rows: list[EngineSequence], outbox: Outbox) -> None:
        """One eager decode forward: a token for every row of the batch cache."""
        input_ids = torch.tensor([[s.last_token] for s in rows], dtype=torch.long, device=self.device)
        try:
            mask, positions = self._kv.prepare_step()
            logits = self._forward_step(input_ids, mask, positions)
            self._kv.finish_step()
            assert self._sampler is not None
            tokens = self._sampler.sample(logits)
        except Exception as exc:
            logger.exception("decode step over %d sequence(s) failed", len(rows))
            self._fail_all(rows, exc, outbox)
            return
        self._output.accept(rows, tokens.tolist(), outbox)

    def _retain(self, seq: EngineSequence, row: int) -> None:
        """Eager path: copy a leaving row's keys and values into the prefix cache (not after a failure)."""
        assert self._prefix is not None
        if seq.finish == "error":
            return
        count, (keys, values) = self._kv.row_tokens(row), self._kv.copy_row(row)
        ids = [*seq.prompt_ids, *seq.output][:count]
        if len(ids) == count:
            self._prefix.insert(ids, keys, values, seq.session_key)
