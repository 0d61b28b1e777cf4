"""The CUDA path's steps: chunked prefill into the static cache, and decode steps queued one ahead.

:class:`StaticSteps` is a part of :class:`~chatstream_asgi.engines.transformers.engine.TransformersEngine`
kept in its own module: its methods run on the generation thread, over the engine's static cache, graph
runners, sampler and rows.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from chatstream_asgi.engines.transformers.output import fail, finish
from chatstream_asgi.engines.transformers.sequence import EngineSequence, Outbox

if TYPE_CHECKING:
    from chatstream_asgi.engines.transformers.graph_runner import DecodeRunner, PrefillRunner
    from chatstream_asgi.engines.transformers.output import OutputProcessor
    from chatstream_asgi.engines.transformers.sampling import BatchSampler
    from chatstream_asgi.engines.transformers.slot_prefix import SlotEntry, SlotPrefixIndex
    from chatstream_asgi.engines.transformers.static_cache import StaticKVCache

__all__ = ["DEFAULT_PREFILL_CHUNK", "StaticSteps"]

logger = logging.getLogger("chatstream_asgi.engine")

DEFAULT_PREFILL_CHUNK = 256
"""Prompt tokens prefilled beside one decode step while rows run (``max_prefill_tokens``'s default)."""


class StaticSteps:
    """The static-cache steps of the engine (see the module docstring)."""

    context_len: int
    max_prefill_tokens: int | None
    _static_kv: StaticKVCache | None
    _runner: DecodeRunner | None
    _prefill_runner: PrefillRunner | None
    _sampler: BatchSampler | None
    _output: OutputProcessor
    _active: list[EngineSequence]
    _prefilling: deque[EngineSequence]
    _pending: deque[EngineSequence]
    _pad_id: int
    _stopping: bool
    _slot_prefix: SlotPrefixIndex | None

    def _prefill_turn(self, waiting: list[EngineSequence], outbox: Outbox) -> bool:
        """Static path: queue ``waiting`` for prefill and run one prefill forward (if any waits).

        With rows running, the prefill forward and one decode step of those rows are queued
        together, on two streams (:class:`PrefillRunner`), so the GPU runs them side by side, and
        the host delivers the step's tokens while the chunk may still run. Returns whether that
        decode step ran (the turn's decode is then done).
        """
        self._prefilling.extend(waiting)
        for seq in self._prefilling:
            if seq.stream.cancelled:
                finish(seq, "cancelled", outbox)
        self._prefilling = deque(s for s in self._prefilling if s.finish is None)
        rows = list(self._active)
        if not self._prefilling:
            return False
        self._prefill_chunks(outbox)  # queued first: the decode step goes beside it, not behind
        if not rows:
            return False
        outbox.flush(hold_ends=True)  # a completed prompt's first token goes out now, not after the step
        try:
            pending = self._launch(rows, first=True)
        except Exception as exc:
            logger.exception("decode step over %d sequence(s) failed", len(rows))
            self._fail_all(self._active, exc, outbox)
            return True
        try:
            tokens = pending()
        except Exception as exc:  # the device failed: the joined rows' state is as unknown as the others'
            logger.exception("decode step over %d sequence(s) failed", len(rows))
            self._fail_all(self._active, exc, outbox)
            return True
        self._output.accept(rows, tokens, outbox)
        return True

    def _prefill_chunks(self, outbox: Outbox) -> None:
        """Static path: one prefill forward, oldest prompts first.

        While rows are running, each prompt contributes at most ``max_prefill_tokens`` tokens, so
        a long one goes in chunks beside decode steps; an idle engine prefills prompts whole. Prompts
        are batched while the padded batch fits one captured prefill shape (a replay costs about the
        same for any of its shapes), whatever columns each begins at: a partly prefilled prompt's next
        chunk, new prompts, and new prompts whose beginning is held in a retained slot (looked up when
        their turn comes; only the rest is prefilled). Sequences whose prompt completes join the batch
        at rows ``n, n+1, ...`` (their slots); at most one, the last, stays partly prefilled, in the top
        slot, until a later turn. A hit's held beginning is used in place or moved to its slot, and
        retained entries on the slots these prompts take move away or are evicted
        (:class:`SlotPrefixIndex`), all in one gather before the forward.
        """
        kv = self._static_kv
        runner = self._prefill_runner
        assert kv is not None and runner is not None
        runner.join()  # the last chunk is done with its slots and inputs (device-side wait)
        index = self._slot_prefix
        limit = (self.max_prefill_tokens or self.context_len) if self._active else self.context_len
        chunks: list[tuple[EngineSequence, int, int]] = []
        hits: dict[int, tuple[SlotEntry, int]] = {}  # chunk -> the retained slot its prompt begins with, its index
        for seq in self._prefilling:
            entry = None
            if seq.slot < 0 and index is not None:  # a new prompt: its beginning may be held in a retained slot
                entry, seq.cached = index.match(seq.prompt_ids)
            take = min(len(seq.prompt_ids) - seq.cached, limit)
            width = max([take, *(t for _, _, t in chunks)])
            kv_len = max([seq.cached + take, *(s + t for _, s, t in chunks)])
            if chunks and not runner.batchable(len(chunks) + 1, width, kv_len):
                seq.cached = seq.cached if seq.slot >= 0 else 0  # matched again when its turn comes
                break
            if entry is not None:
                hits[len(chunks)] = entry, entry.slot
            chunks.append((seq, seq.cached, take))
            if seq.cached + take < len(seq.prompt_ids):
                break  # at most one prompt is left partly prefilled
        first_row = len(self._active)
        done = [seq for seq, start, take in chunks if start + take == len(seq.prompt_ids)]
        targets = [first_row + i if i < len(done) else kv.rows - 1 for i in range(len(chunks))]
        moves = [(seq.slot, target, seq.cached) for (seq, _, _), target in zip(chunks, targets, strict=True)]
        for i, (entry, source) in hits.items():
            assert index is not None
            index.claim(entry, chunks[i][1])  # a whole entry is taken over, a shared beginning copied
            moves[i] = (source, targets[i], chunks[i][1])
        if index is not None:
            moves += index.make_room(kv.rows, first_row, targets)
        kv.move_slots([(src, dst) for src, dst, _ in moves if src >= 0], max(n for _, _, n in moves))
        for (seq, start, _), target in zip(chunks, targets, strict=True):
            if seq.slot < 0:
                seq.reused = start
                self._count_prompt(seq)
            seq.slot = target
        width = max(take for _, _, take in chunks)
        ids = torch.full((len(chunks), width), self._pad_id, dtype=torch.long)
        positions = torch.zeros((len(chunks), width), dtype=torch.long)
        columns = torch.full((len(chunks), width), kv.scratch, dtype=torch.long)
        for row, (seq, start, take) in enumerate(chunks):
            ids[row, width - take :] = torch.tensor(seq.prompt_ids[start : start + take], dtype=torch.long)
            positions[row, width - take :] = torch.arange(start, start + take)
            columns[row, width - take :] = positions[row, width - take :]
        slots = torch.tensor([seq.slot for seq, _, _ in chunks], dtype=torch.long)
        kv_len = max(start + take for _, start, take in chunks)
        try:
            logits = self._forward_prefill(ids, positions, columns, slots, kv_len)
            if done:
                runner.join()
                sampler = self._get_sampler(logits.shape[-1])
                sampler.add_rows([s.params for s in done], [s.prompt_ids for s in done])
                tokens = sampler.sample(logits[: len(done)], slice(first_row, first_row + len(done)))
        except Exception as exc:
            logger.exception("prefill of %d sequence(s) failed", len(chunks))
            if self._sampler is not None:
                self._sampler.keep_rows(range(min(first_row, len(self._sampler))))
            for seq, _, _ in chunks:
                fail(seq, exc, outbox)
            self._prefilling = deque(s for s in self._prefilling if s.finish is None)
            return
        for seq, start, take in chunks:
            seq.cached = start + take
        for _ in done:
            self._prefilling.popleft()
        self._active.extend(done)
        if done:
            self._output.accept(done, tokens.tolist(), outbox)

    def _compact(self, rows: list[EngineSequence], order: list[int]) -> None:
        """After rows left: running row ``order[j]`` moves to slot ``j``; a leaving row's slot is retained.

        A leaving row below the new batch size is a hole that the row from the end fills; its own columns
        go to that row's old slot (a swap), where they stay as a retained entry (not after a failure).
        """
        kv = self._static_kv
        assert kv is not None
        moves = [(i, j) for j, i in enumerate(order) if i != j]
        columns = max((rows[i].cached for i in order), default=0)
        index = self._slot_prefix
        for i, seq in enumerate(rows):
            if index is None or seq.finish in (None, "error") or not seq.cached:
                continue
            slot = order[i] if i < len(order) else i
            ids = [*seq.prompt_ids, *seq.output][: seq.cached]
            if len(ids) == seq.cached and index.retain(slot, ids, seq.session_key) and slot != i:
                moves.append((i, slot))
                columns = max(columns, seq.cached)
        kv.move_slots(moves, columns)
        for row, seq in enumerate(self._active):
            seq.slot = row

    def _decode_ahead(self, rows: list[EngineSequence], outbox: Outbox) -> None:
        """Decode steps over ``rows``, each queued on the device before the host reads the one before.

        While the host detokenizes and delivers step ``k``, the device already runs step ``k + 1``
        on step ``k``'s sampled tokens (they never leave the device), so host work overlaps device
        work. Step ``k + 1`` is queued only when no row can reach its length limit at step ``k`` and
        nothing waits to change the batch; if step ``k`` finishes a row or something starts waiting,
        the loop reads step ``k + 1`` for the rows still running and returns, so rows leave and join
        between steps as on the eager path. A step that finishes a row is delivered by the caller, after
        the row has left the batch (its slot retained): whoever sees a reply end sees the engine past it.
        """
        pending = self._launch(rows, first=True)
        while True:
            ahead = self._launch(rows, first=False) if self._can_run_ahead(rows) else None
            self._output.accept(rows, pending(), outbox)
            outbox.flush(hold_ends=True)  # a finished row is retired before its end goes out
            if ahead is None:
                return
            if any(s.finish is not None for s in rows) or not self._can_run_ahead(rows, ahead=False):
                live = [(s, t) for s, t in zip(rows, ahead(), strict=True) if s.finish is None]
                if live:
                    self._output.accept([s for s, _ in live], [t for _, t in live], outbox)
                outbox.flush(hold_ends=True)
                return
            pending = ahead

    def _launch(self, rows: list[EngineSequence], *, first: bool) -> Callable[[], list[int]]:
        """Queue one decode step and the sampling of its tokens; return the call that reads them.

        ``first``: the input tokens come from the host (the batch changed); else from the device,
        where the previous step's sampled tokens were fed back.
        """
        assert self._runner is not None and self._sampler is not None
        positions = torch.tensor([s.cached for s in rows], dtype=torch.long)
        input_ids = torch.tensor([[s.last_token] for s in rows], dtype=torch.long) if first else None
        for seq in rows:
            seq.cached += 1
        tokens = self._sampler.sample(self._forward_step(positions, input_ids), slice(0, len(rows)))
        self._runner.feed(tokens)
        return self._runner.fetch(tokens)

    def _can_run_ahead(self, rows: list[EngineSequence], *, ahead: bool = True) -> bool:
        """Whether the next step may be queued before this one is read (see :meth:`_decode_ahead`)."""
        kv = self._static_kv
        assert kv is not None
        if self._stopping or self._prefilling or (self._pending and len(rows) < kv.rows):
            return False
        if any(s.stream.cancelled for s in rows):
            return False
        return not ahead or all(s.generated + 1 < self._output.limit(s) for s in rows)
