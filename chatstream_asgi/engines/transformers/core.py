"""The generation thread's loop: admit, plan a step, run it, sample, deliver, retire.

:class:`EngineCore` is the engine's core in vLLM v1's sense: what runs on the generation thread of a
:class:`~chatstream_asgi.engines.transformers.engine.TransformersEngine`. It holds the sequences (waiting,
being prefilled, running), the sampler and the output processing, and one KV path
(:class:`~chatstream_asgi.engines.transformers.kv_path.KVPath`) that owns the cache and runs each step's
forward. Where the path only queues its steps (the slotted cache), the loop queues the next step
before it reads this one's tokens.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence

import torch

from chatstream_asgi.engines.transformers.kv_path import KVPath
from chatstream_asgi.engines.transformers.output import OutputProcessor, fail, finish
from chatstream_asgi.engines.transformers.planning import StepPlan
from chatstream_asgi.engines.transformers.sampling import BatchSampler
from chatstream_asgi.engines.transformers.sequence import EngineSequence, Outbox

__all__ = ["EngineCore"]

logger = logging.getLogger("chatstream_asgi.engine")


class EngineCore:
    """The loop over ``path`` for an engine named ``name`` on ``device`` (see the module docstring).

    :meth:`submit` and :meth:`stop` are called from any thread; everything else runs on the generation
    thread (:meth:`run`).
    """

    def __init__(self, path: KVPath, output: OutputProcessor, device: torch.device, vocab_size: int, name: str) -> None:
        self.path = path
        self._output = output
        self.device = device
        self._vocab_size = vocab_size
        self.name = name
        self.ready = threading.Event()
        self.start_error: BaseException | None = None
        self.cond = threading.Condition()
        self.pending: deque[EngineSequence] = deque()
        self.stopping = False
        # Owned by the generation thread:
        self.active: list[EngineSequence] = []  # running rows, in row (and slot) order
        self.prefilling: deque[EngineSequence] = deque()  # admitted, prompt not fully in the cache
        self._sampler: BatchSampler | None = None
        self._leaving: list[EngineSequence] = []  # rows that left the batch before their last token was read
        self.prefix_hit_tokens = 0
        self.prefill_tokens = 0

    def submit(self, seq: EngineSequence) -> None:
        """Queue ``seq`` (any thread)."""
        with self.cond:
            self.pending.append(seq)
            self.cond.notify()

    def stop(self) -> None:
        """Make :meth:`run` return after its current step; open streams finish with ``cancelled``."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()

    @property
    def busy(self) -> int:
        """Sequences holding a place in the cache: running and being prefilled."""
        return len(self.active) + len(self.prefilling)

    def run(self) -> None:
        """The generation thread: start the path, then admit, step and retire until stopped."""
        with torch.inference_mode():
            try:
                if self.device.type == "cuda":  # the thread's current device: graph capture and kernels run there
                    torch.cuda.set_device(self.device)
                self.path.start()
            except BaseException as exc:
                logger.exception("engine %s failed to start", self.name)
                self.start_error = exc
                self.ready.set()
                self.stopping = True
            else:
                self.ready.set()
                reuse = "on" if self.path.reuses_prefixes else "off"
                logger.info("engine %s started on %s; prefix reuse %s", self.name, self.device, reuse)
            while True:
                with self.cond:
                    while not (self.pending or self.active or self.prefilling or self.stopping):
                        self.cond.wait()
                    if self.stopping:
                        break
                    room = self.path.rows - self.busy
                    admitted = [self.pending.popleft() for _ in range(min(room, len(self.pending)))]
                try:
                    self._iteration(admitted)
                except Exception as exc:  # a bug outside the guarded steps: fail the batch, keep serving
                    logger.exception("engine step failed")
                    self._fail_all([*self.active, *self.prefilling, *self._leaving, *admitted], exc)
        self._close_all()
        logger.info("engine %s stopped", self.name)

    def _iteration(self, admitted: list[EngineSequence]) -> None:
        """One loop turn: drop cancelled sequences, run steps (see :meth:`_steps`), retire finished rows.

        A step's finishes are delivered after the retirement, so whoever sees a reply end sees the engine
        past it (its keys and values kept for reuse).
        """
        outbox = Outbox()
        self._leaving = []
        try:
            for seq in [*admitted, *self.prefilling, *self.active]:
                if seq.stream.cancelled and seq.finish is None:
                    finish(seq, "cancelled", outbox)
            self.prefilling.extend(s for s in admitted if s.finish is None)
            self.prefilling = deque(s for s in self.prefilling if s.finish is None)
            self._retire()
            plan = self.path.plan(self.active, self.prefilling)
            if plan.decode or plan.chunks:
                try:
                    self._steps(plan, outbox)
                except Exception as exc:  # the device failed: the rows' cache state is unknown
                    logger.exception("step over %d sequence(s) failed", len(plan.decode) + len(plan.chunks))
                    self._fail_all([*self.active, *self.prefilling, *self._leaving], exc, outbox)
            self._retire()
        finally:  # what this turn produced is delivered even when it fails past the steps (the caller fails the rest)
            outbox.flush()

    def _steps(self, plan: StepPlan, outbox: Outbox) -> None:
        """Run ``plan``, and while the loop may, the steps after it, each queued on the device before the
        host reads the one before (where the path queues: the slotted cache).

        While the host detokenizes and delivers step ``k``, the device already runs step ``k + 1`` on step
        ``k``'s sampled tokens (they never leave the device). The batch changes between queued steps: rows
        that finished, and rows whose last token step ``k + 1`` samples (their length limit), leave before
        step ``k + 2`` is planned (:meth:`_plan_ahead`), and a request that can be admitted joins the step
        planned next (:meth:`_admit_while_running`). The run stops, and the loop turn takes over, when a
        request waits that cannot be admitted (no room, cancelled), a row was cancelled, or a row's token
        must be read before its next is picked (:meth:`_may_run_ahead`). A row's end is delivered after
        it has left the batch (its slot retained).
        """
        pending = self._launch(plan, outbox, fed=False)
        while True:
            ahead_plan = self._plan_ahead(plan, outbox)
            ahead = self._launch(ahead_plan, outbox, fed=True) if ahead_plan is not None else None
            self._deliver(plan, pending(), outbox)
            outbox.flush(hold_ends=True)  # a finished row is retired before its end goes out
            if ahead is None or ahead_plan is None:
                return
            plan, pending = ahead_plan, ahead

    def _admit_while_running(self) -> None:
        """Take waiting sequences into the prefilling ones where there is room, between queued steps.

        A request that arrives while steps run ahead joins the next planned step: stopping the run to admit
        it in the next loop turn left the device idle while the host delivered, retired and planned (about
        1.7 ms on an H100 for a 2,000-token prompt joining 15 streams), a gap in every running stream.
        A cancelled one stays waiting: the loop turn finishes it.
        """
        if not self.pending or not self.path.runs_ahead:
            return
        with self.cond:
            room = self.path.rows - self.busy
            while room > 0 and self.pending and not self.stopping and not self.pending[0].stream.cancelled:
                self.prefilling.append(self.pending.popleft())
                room -= 1

    def _launch(self, plan: StepPlan, outbox: Outbox, *, fed: bool) -> Callable[[], list[int]]:
        """Queue ``plan`` on the path; completed prompts become running rows (in slot order) at once."""
        for chunk in plan.chunks:
            seq = chunk.seq
            if not seq.started:  # its first chunk: count the prompt tokens reused and computed, once
                seq.started, seq.reused = True, chunk.start
                seq.stream.cached_tokens = chunk.start
                self.prefix_hit_tokens += chunk.start
                self.prefill_tokens += len(seq.prompt_ids) - chunk.start
        pending = self.path.launch(plan, self._get_sampler(), outbox, fed=fed)
        done = [s for s in plan.completed if s.finish is None]
        if done:
            self.active.extend(done)
            self.prefilling = deque(s for s in self.prefilling if s not in done and s.finish is None)
        return pending

    def _deliver(self, plan: StepPlan, tokens: list[int], outbox: Outbox) -> None:
        """Hand each sampled sequence still running its token (text, finishes, log-probabilities where
        asked); drop the others' tokens. Row ``i`` of the sampler is ``plan.sampled[i]``."""
        seqs = plan.sampled
        # Only a plan with watched rows reads the report: no step ran ahead of it to overwrite it.
        reported = self._get_sampler().take_logprobs(len(seqs)) if any(s.watched for s in seqs) else None
        live = [n for n, s in enumerate(seqs) if s.finish is None]
        if live:
            asked = [reported[n] for n in live] if reported is not None else None
            self._output.accept([seqs[n] for n in live], [tokens[n] for n in live], outbox, asked)

    def _plan_ahead(self, plan: StepPlan, outbox: Outbox) -> StepPlan | None:
        """The step after ``plan``, planned before ``plan``'s tokens are read, where that is allowed.

        Rows that finished, and rows whose last token ``plan`` samples, leave the batch first (their slots
        move and are retained behind ``plan`` on the device, their ends go out): stopping the run for them
        left the device idle while the host delivered, retired and planned (a gap in every running stream
        at every finish). A row that stops at a token ``plan`` samples is in the next step too, its token
        dropped, as when it stopped before.
        """
        if not self.path.runs_ahead:
            return None
        self._admit_while_running()  # what arrived since the last look
        if not self._may_run_ahead(plan):
            return None
        self._retire(ahead=True)
        outbox.flush()  # the ends held for rows that left
        if not (self.active or self.prefilling):
            return None
        return self.path.plan(self.active, self.prefilling)

    def _may_run_ahead(self, plan: StepPlan) -> bool:
        """Whether the step after ``plan`` may be queued before ``plan`` is read (see :meth:`_steps`):
        nothing waits that cannot be admitted, nothing was cancelled, and no row needs its token read
        before its next is picked (a grammar, log-probabilities: :attr:`EngineSequence.watched`)."""
        if self.stopping or (self.pending and self.busy < self.path.rows):
            return False
        rows = plan.sampled
        if not rows or any(s.stream.cancelled for s in (*rows, *self.prefilling)):
            return False
        return not any(s.watched for s in rows)

    def _get_sampler(self) -> BatchSampler:
        if self._sampler is None:
            self._sampler = BatchSampler(self._vocab_size, self.device)
        return self._sampler

    def _retire(self, *, ahead: bool = False) -> None:
        """Drop finished rows (``ahead``: and rows whose last token the queued step samples, their ends still
        to come), filling the holes with rows from the end to move little cache."""
        rows = self.active
        gone = [i for i, s in enumerate(rows) if s.finish is not None or (ahead and self._last_queued(s))]
        if not gone:
            return
        self._leaving = [rows[i] for i in gone if rows[i].finish is None]
        keep, leaving = len(rows) - len(gone), set(gone)
        order = list(range(keep))
        movers = (i for i in range(keep, len(rows)) if i not in leaving)
        for hole in (i for i in gone if i < keep):
            order[hole] = next(movers)
        self.path.retire(rows, order)
        self.active = [rows[i] for i in order]
        if self._sampler is not None:
            self._sampler.keep_rows(order)

    def _last_queued(self, seq: EngineSequence) -> bool:
        """Whether the step queued and not yet read samples ``seq``'s last token (its length limit)."""
        return seq.generated + 1 >= self._output.limit(seq)

    def _fail_all(self, seqs: Sequence[EngineSequence], exc: BaseException, outbox: Outbox | None = None) -> None:
        """Fail every given sequence and reset the batch (its cache state is unknown)."""
        box = outbox or Outbox()
        for seq in seqs:
            if seq.finish is None:
                fail(seq, exc, box)
        self.active = []
        self.prefilling = deque()
        self.path.reset()
        if self._sampler is not None:
            self._sampler.keep_rows([])
        if outbox is None:
            box.flush()

    def _close_all(self) -> None:
        """At shutdown: finish every running and waiting sequence with ``cancelled``."""
        outbox = Outbox()
        with self.cond:
            waiting, self.pending = list(self.pending), deque()
        for seq in [*self.active, *self.prefilling, *self._leaving, *waiting]:
            if seq.finish is None:
                finish(seq, "cancelled", outbox)
        self.active = []
        self.prefilling = deque()
        self.path.reset()
        if self._sampler is not None:
            self._sampler.keep_rows([])
        outbox.flush()
