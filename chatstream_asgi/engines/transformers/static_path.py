"""The slotted cache's path (CUDA by default): one forward a step, replayed as a CUDA graph, queued ahead.

:class:`StaticPath` owns a :class:`~chatstream_asgi.engines.transformers.static_cache.StaticKVCache` of
slots sized from the KV budget, the :class:`~chatstream_asgi.engines.transformers.slot_prefix.SlotPrefixIndex`
of finished sequences' slots kept for reuse, and the
:class:`~chatstream_asgi.engines.transformers.step_runner.StepRunner` that runs each step (captured at
start, fused by ``torch.compile`` where that measured faster). A step is the running rows' next tokens and
a chunk of prompt tokens (:func:`~chatstream_asgi.engines.transformers.planning.pack_chunk`): while rows
run, at most ``max_prefill_tokens`` prompt tokens a step, so a long prompt joins over several steps each
about as long as a decode step; an idle engine packs as many prompts as one captured chunk holds.

A launch only queues the step and the sampling of its tokens (which stay on the device as the next
step's inputs): the loop queues the next step before it reads this one, so host work overlaps device work.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

from chatstream_asgi.engines.transformers.compiled_step import compile_steps
from chatstream_asgi.engines.transformers.graphs import capture_all
from chatstream_asgi.engines.transformers.kv_layout import KVLayout
from chatstream_asgi.engines.transformers.model_runner import ModelRunner
from chatstream_asgi.engines.transformers.planning import StepPlan, pack_chunk, slot_targets
from chatstream_asgi.engines.transformers.sampling import BatchSampler
from chatstream_asgi.engines.transformers.sequence import EngineSequence, Outbox
from chatstream_asgi.engines.transformers.slot_prefix import SlotEntry, SlotPrefixIndex
from chatstream_asgi.engines.transformers.static_cache import StaticKVCache, UnsupportedModel, plan_rows
from chatstream_asgi.engines.transformers.step_runner import StepRunner

__all__ = ["DEFAULT_PREFILL_CHUNK", "StaticPath"]

logger = logging.getLogger("chatstream_asgi.engine")

_STARTING = threading.Lock()
"""One slotted-cache start at a time in a process (an engine per GPU, each starting on its own thread): the
budget reads the device's free memory, which a second engine on the same GPU must read after the first one's
cache is allocated, and ``torch.compile`` and graph capture are not made to run in two threads at once."""

DEFAULT_PREFILL_CHUNK = 128
"""Prompt tokens prefilled beside one decode step while rows run (``max_prefill_tokens``'s default): about
where a step stops being bound by reading the weights (a GPU does ~200-300 multiply-adds per weight byte it
reads), so a joining prompt costs the running rows little per step (measured: docs/benchmarks.md)."""

Forward = Callable[..., torch.Tensor]


class StaticPath:
    """The slotted cache with its retained slots and step runner (see the module docstring).

    ``forward_step(positions, inputs, chunks)`` and ``forward_prefill(positions, inputs, chunks)`` are the
    engine's hooks around :meth:`run_step` (a step with decode rows, a chunk alone).
    """

    runs_ahead = True

    def __init__(
        self,
        runner: ModelRunner,
        layout: KVLayout,
        *,
        device: torch.device,
        context_len: int,
        max_rows: int,
        pad_id: int,
        budget: dict[str, float | None],
        cuda_graphs: bool,
        compile_mode: str | None,
        max_prefill_tokens: int | None,
        prefix_cache: bool,
        strict: bool,
        forward_step: Forward,
        forward_prefill: Forward,
    ) -> None:
        self._model = runner
        self.layout = layout
        self.device = device
        self.context_len = context_len
        self.max_rows = max_rows
        self._pad_id = pad_id
        self._budget = budget
        self.cuda_graphs = cuda_graphs
        self.compile_mode = compile_mode
        self.max_prefill_tokens = max_prefill_tokens
        self._strict = strict
        self._forward_step = forward_step
        self._forward_prefill = forward_prefill
        rings = layout.has_rings(context_len)
        self.index = SlotPrefixIndex(whole_entries=rings) if prefix_cache else None
        self.reuses_prefixes = prefix_cache
        self._per_sequence = layout.ring_chunk if rings else context_len
        self.kv: StaticKVCache | None = None
        self.runner: StepRunner | None = None
        self._hits: dict[int, SlotEntry] = {}  # id(seq) -> the retained entry its planned chunk reuses

    @property
    def rows(self) -> int:
        return self.kv.rows if self.kv is not None else self.max_rows

    def start(self) -> None:
        """Allocate the slots from the budget, build the runner, compile and capture its steps (once; one
        engine of the process at a time, see :data:`_STARTING`)."""
        with _STARTING:
            if self.kv is None:
                self._start()

    def _start(self) -> None:
        layout, context = self.layout, self.context_len
        rows = plan_rows(layout, context, self.max_rows, self.device, **self._budget)
        self.kv = kv = StaticKVCache(layout, rows, context, self.device)
        rings = sorted({r for r in kv.rings.values() if r is not None})
        logger.info(
            "KV cache: %d rows x %d tokens, %.2f GiB (%d bytes a token in full-attention layers%s)%s",
            rows,
            context,
            kv.nbytes / 2**30,
            layout.bytes_per_token,
            f"; sliding layers keep rings of {', '.join(map(str, rings))} columns" if rings else "",
            "" if rows == self.max_rows else f"; the budget caps the batch below {self.max_rows}",
        )
        placeholder = self._model.placeholder
        graphs = self.cuda_graphs and self.device.type == "cuda"
        self.runner = StepRunner(
            self._model.call, kv, self._pad_id, placeholder, use_graphs=graphs, chunk=self.max_prefill_tokens
        )
        if not self.runner.shapes:
            return
        try:
            if self.compile_mode:
                compile_steps(self.runner, self._model.model, self.device, self.compile_mode)
            capture_all([self.runner], self.device)
        except Exception as exc:
            if self._strict:
                raise UnsupportedModel(f"capturing the steps in CUDA graphs failed: {exc!r}") from exc
            logger.warning("CUDA graphs off (the steps run eagerly): capturing them failed: %r", exc)
            self.runner = StepRunner(
                self._model.call, kv, self._pad_id, placeholder, use_graphs=False, chunk=self.max_prefill_tokens
            )

    # -- planning --------------------------------------------------------------------------------

    def plan(self, running: Sequence[EngineSequence], prefilling: Sequence[EngineSequence]) -> StepPlan:
        """The running rows, and a chunk of prompts: at most ``max_prefill_tokens`` while rows run, else as
        much as one captured chunk holds (a prompt joining running rows takes several steps)."""
        runner = self.runner
        assert runner is not None
        self._hits = {}
        budget = (self.max_prefill_tokens or self.context_len) if running else runner.token_buckets[-1]
        chunks = pack_chunk(
            prefilling,
            budget=budget,
            per_sequence=self._per_sequence,
            cached=self._cached,
            fits=lambda tokens, columns, seqs: runner.fits(len(running), tokens, columns, seqs),
        )
        self._hits = {id(c.seq): self._hits[id(c.seq)] for c in chunks if id(c.seq) in self._hits}
        return StepPlan(list(running), chunks)

    def _cached(self, seq: EngineSequence) -> int:
        """Prompt tokens of ``seq`` in the cache: its earlier chunks, or for a new prompt a retained entry's."""
        if seq.slot >= 0 or self.index is None:
            return seq.cached
        entry, common = self.index.match(seq.prompt_ids)
        if entry is not None:
            self._hits[id(seq)] = entry
        return common

    # -- the step --------------------------------------------------------------------------------

    def launch(self, plan: StepPlan, sampler: BatchSampler, outbox: Outbox, *, fed: bool) -> Callable[[], list[int]]:
        runner = self.runner
        assert runner is not None
        if plan.chunks:
            self._place(plan, len(plan.decode))
        positions = torch.tensor([s.cached for s in plan.decode], dtype=torch.long)
        inputs = None if fed else [s.last_token for s in plan.decode]
        for seq in plan.decode:
            seq.cached += 1
        chunks = [(c.seq.slot, c.start, c.seq.prompt_ids[c.start : c.end], c.completes) for c in plan.chunks]
        forward = self._forward_step if plan.decode else self._forward_prefill
        logits = forward(positions, inputs, chunks)
        for chunk in plan.chunks:
            chunk.seq.cached = chunk.end
        done = plan.completed
        if done:
            sampler.add_rows([s.params for s in done], [s.prompt_ids for s in done], [s.grammar for s in done])
        tokens = sampler.sample(logits, slice(0, len(plan.decode) + len(done)))
        runner.feed(tokens)
        return runner.fetch(tokens)

    def run_step(self, positions: torch.Tensor, inputs: list[int] | None, chunks: list[Any]) -> torch.Tensor:
        """The step's forward (:meth:`StepRunner.launch`), queued."""
        assert self.runner is not None
        return self.runner.launch(positions, inputs, chunks)

    run_prefill = run_step  # one forward either way: a step without decode rows is a chunk alone

    def _place(self, plan: StepPlan, running: int) -> None:
        """Give each chunk's sequence its slot: a prompt completed by this chunk joins the running rows, a
        partial one waits in the top slot. A new prompt's reused beginning is used where its retained slot
        is, or moved to its slot; retained entries on the slots these prompts take move away or are evicted
        (:class:`SlotPrefixIndex`), all in one gather before the forward."""
        kv = self.kv
        assert kv is not None
        index = self.index
        targets = slot_targets(plan.chunks, running, kv.rows)
        moves = []
        for chunk, target in zip(plan.chunks, targets, strict=True):
            seq = chunk.seq
            entry = self._hits.get(id(seq))
            if entry is not None and index is not None:
                index.claim(entry, chunk.start)  # a whole entry is taken over, a shared beginning copied
                moves.append((entry.slot, target, chunk.start))
            elif seq.slot >= 0:
                moves.append((seq.slot, target, seq.cached))
        if index is not None:
            moves += index.make_room(kv.rows, running, targets)
        kv.move_slots([(src, dst) for src, dst, _ in moves], max((n for _, _, n in moves), default=0))
        for chunk, target in zip(plan.chunks, targets, strict=True):
            chunk.seq.slot = target
        self._hits = {}

    # -- rows leaving ----------------------------------------------------------------------------

    def retire(self, rows: Sequence[EngineSequence], order: Sequence[int]) -> None:
        """Running row ``order[j]`` moves to slot ``j``; a leaving row's slot is retained for reuse.

        A leaving row below the new batch size is a hole that the row from the end fills; its own columns
        go to that row's old slot (a swap), where they stay as a retained entry (not after a failure).
        The moves and the inputs fed to the next step follow the rows, queued behind any queued step.
        """
        kv, runner = self.kv, self.runner
        assert kv is not None and runner is not None
        runner.keep_fed(order)
        moves = [(i, j) for j, i in enumerate(order) if i != j]
        columns = max((rows[i].cached for i in order), default=0)
        index, kept = self.index, set(order)
        for i, seq in enumerate(rows):
            if index is None or i in kept or seq.finish == "error" or not seq.cached:
                continue
            slot = order[i] if i < len(order) else i
            ids = [*seq.prompt_ids, *seq.output][: seq.cached]
            if len(ids) == seq.cached and index.retain(slot, ids, seq.session_key) and slot != i:
                moves.append((i, slot))
                columns = max(columns, seq.cached)
        kv.move_slots(moves, columns)
        for row, i in enumerate(order):
            rows[i].slot = row

    def reset(self) -> None:
        if self.index is not None:
            self.index.clear()

    def release(self, session_key: str) -> int:
        return self.index.release(session_key) if self.index is not None else 0

    @property
    def held_tokens(self) -> int:
        return self.index.tokens if self.index is not None else 0

    def usage(self, busy: int) -> float:
        """The share of the slots that running and prefilling sequences hold (retained slots are free)."""
        return busy / self.kv.rows if self.kv is not None else 0.0
