"""A continuous-batching engine for Hugging Face transformers causal language models.

One generation thread per engine runs a loop of steps. Requests from :meth:`TransformersEngine.generate`
wait in a queue; at the start of a step the waiting ones are prefilled together and merged into the
running batch, then one decode forward produces one token for every row. Finished and cancelled rows
leave between steps. Each step's text deltas are handed to the event loop with one
``call_soon_threadsafe`` per loop, where they are pushed into the requests'
:class:`~chatstream_asgi.engines.base.QueueStream`.

Two key/value caches back the batch. On CPU (by default), :class:`BatchKVCache` grows with the
batch and right-aligns its rows. On CUDA, :class:`StaticKVCache` holds a fixed number of slots sized
from a memory budget, allocated once at start-up; the decode step runs as a CUDA graph replay
(:class:`DecodeRunner`), and prompts are prefilled eagerly, in chunks of at most
``max_prefill_tokens`` between decode steps when that is set, so running streams keep flowing while
a long prompt joins.

Importing this module imports torch and transformers; ``import chatstream_asgi`` does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from chatstream_asgi.engines.base import (
    ChatMessage,
    EngineError,
    FinishReason,
    GenerationParams,
    GenerationRequest,
    GenerationStream,
    PromptTooLong,
    QueueStream,
)
from chatstream_asgi.engines.transformers.batch_cache import BatchKVCache
from chatstream_asgi.engines.transformers.detokenizer import IncrementalDetokenizer, StopMatcher, decode_windows
from chatstream_asgi.engines.transformers.graph_runner import DecodeRunner, PrefillRunner, capture_all
from chatstream_asgi.engines.transformers.loading import DEFAULT_MODEL, generation_defaults, load_model
from chatstream_asgi.engines.transformers.prefix_cache import PrefixCache, PrefixEntry
from chatstream_asgi.engines.transformers.sampling import BatchSampler
from chatstream_asgi.engines.transformers.static_cache import KVLayout, StaticKVCache, UnsupportedModel, plan_rows

__all__ = ["TransformersEngine"]

logger = logging.getLogger("chatstream_asgi.engine")


@dataclass(eq=False)
class _Sequence:
    """One request's state inside the engine (owned by the generation thread once admitted)."""

    stream: QueueStream
    prompt_ids: list[int]
    params: GenerationParams
    ignore_eos: bool
    detokenizer: IncrementalDetokenizer
    stop: StopMatcher
    generated: int = 0
    last_token: int = 0
    finish: FinishReason | None = None
    cached: int = 0  # tokens in the static cache (static path)
    slot: int = -1  # the static cache slot holding them (static path)
    session_key: str | None = None
    output: list[int] = field(default_factory=list)  # generated ids, kept for the prefix cache
    reused: int = 0  # leading prompt tokens whose keys and values come from the prefix cache
    prefix: PrefixEntry | None = None  # where they come from, until copied into the batch


class _Outbox:
    """Producer calls collected during one step, delivered with one wake-up per event loop."""

    def __init__(self) -> None:
        self._calls: dict[asyncio.AbstractEventLoop, list[tuple[Callable[..., None], tuple, dict]]] = {}

    def add(self, stream: QueueStream, fn: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        self._calls.setdefault(stream.loop, []).append((fn, args, kwargs))

    def flush(self) -> None:
        calls, self._calls = self._calls, {}
        for loop, items in calls.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
                logger.debug("dropped %d deliveries for a closed event loop", len(items))


def _deliver(items: list[tuple[Callable[..., None], tuple, dict]]) -> None:
    for fn, args, kwargs in items:
        fn(*args, **kwargs)


class TransformersEngine:
    """Continuous-batching engine over a transformers causal LM (see the module docstring).

    ``model`` and ``tokenizer`` are a loaded transformers model and tokenizer; ``context_len``
    defaults to the model's ``max_position_embeddings``; at most ``max_batch_size`` sequences
    decode together (others wait). ``system_prompt``, if set, is prepended to conversations
    without a system message. ``default_generation_params`` is the sampling that suits the model (its
    generation config, or a known alias's recommended values): ``ChatStream`` uses it for the values it
    is not given.

    GPU options (see the module docstring): ``static_cache`` (default: on CUDA) selects the
    preallocated cache, sized by ``kv_cache_memory`` (GiB) or ``gpu_memory_utilization`` (a
    fraction of the card, like vLLM's); fewer rows than ``max_batch_size`` when the budget holds
    fewer. ``cuda_graphs=False`` runs its steps eagerly (for debugging). ``max_prefill_tokens``
    caps the tokens of one prompt prefilled between two decode steps (static cache only; default: no
    cap). ``kv_cache_usage`` is the share of the slots in use.

    Prefix reuse (``prefix_cache``, default on): the keys and values of finished sequences are kept,
    up to ``prefix_cache_memory`` GiB (default 1), and a prompt that begins with held token ids
    prefills only the rest (see :mod:`~chatstream_asgi.engines.transformers.prefix_cache`).
    ``prefix_hit_tokens`` and ``prefill_tokens`` count the prompt tokens reused and computed;
    :meth:`release_session` frees what a conversation held.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        device: str | torch.device = "cpu",
        *,
        context_len: int | None = None,
        max_batch_size: int = 16,
        name: str | None = None,
        system_prompt: str | None = None,
        static_cache: bool | None = None,
        cuda_graphs: bool = True,
        kv_cache_memory: float | None = None,
        gpu_memory_utilization: float | None = None,
        max_prefill_tokens: int | None = None,
        prefix_cache: bool = True,
        prefix_cache_memory: float = 1.0,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        config = model.config
        self.model_name: str = name or getattr(config, "name_or_path", "") or type(model).__name__
        self.context_len: int = context_len or getattr(config, "max_position_embeddings", None) or 2048
        self.max_batch_size = max_batch_size
        self.system_prompt = system_prompt
        self.default_generation_params: dict[str, float] = generation_defaults(model)
        self.eos_token_ids = self._find_eos_ids()
        pad = tokenizer.pad_token_id
        self._pad_id: int = pad if pad is not None else min(self.eos_token_ids, default=0)
        self._num_layers: int = config.get_text_config().num_hidden_layers
        self._cache_arg = "cache" if "cache" in _forward_params(model) else "past_key_values"
        self._attention = _attention_kernels(self.device)
        self.static = self.device.type == "cuda" if static_cache is None else static_cache
        self.cuda_graphs = cuda_graphs
        self.max_prefill_tokens = max_prefill_tokens
        self._budget = {"kv_cache_memory": kv_cache_memory, "gpu_memory_utilization": gpu_memory_utilization}
        self._layout = KVLayout.of(config, model.dtype) if self.static else None
        if not self.static:
            _log_growing_cache(config.get_text_config(), model.dtype.itemsize, max_batch_size, self.context_len)
        self._ready = threading.Event()
        self._start_error: BaseException | None = None

        self._cond = threading.Condition()
        self._pending: deque[_Sequence] = deque()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Owned by the generation thread:
        self._active: list[_Sequence] = []
        self._prefilling: deque[_Sequence] = deque()  # admitted, prompt not fully in the cache (static path)
        self._kv = BatchKVCache(self._num_layers, row_capacity=max_batch_size)
        self._static_kv: StaticKVCache | None = None
        self._runner: DecodeRunner | None = None
        self._prefill_runner: PrefillRunner | None = None
        self._sampler: BatchSampler | None = None
        self._prefix = self._make_prefix_cache(prefix_cache, prefix_cache_memory)
        self.prefix_hit_tokens = 0
        self.prefill_tokens = 0

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str = DEFAULT_MODEL,
        device: str | None = None,
        dtype: Any = None,
        **kw: Any,
    ) -> TransformersEngine:
        """Load a model (``"smollm2"``, a local directory or a hub id) and build an engine on it."""
        model, tokenizer, display_name = load_model(name_or_path, device=device, dtype=dtype)
        kw.setdefault("name", display_name)
        engine = cls(model, tokenizer, model.device, **kw)
        engine.default_generation_params = generation_defaults(model, name_or_path)
        return engine

    # -- Engine protocol ---------------------------------------------------------------------

    async def start(self) -> None:
        """Start the generation thread and wait until it is ready (cache allocated, graphs captured)."""
        self._ensure_thread()
        await asyncio.to_thread(self._ready.wait)
        if self._start_error is not None:
            raise self._start_error

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of the static cache's slots held by running or prefilling sequences (0 without one)."""
        kv = self._static_kv
        return (len(self._active) + len(self._prefilling)) / kv.rows if kv is not None else 0.0

    async def shutdown(self) -> None:
        """Stop the generation thread; open streams finish with ``cancelled``."""
        thread = self._thread
        if thread is None:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        await asyncio.to_thread(thread.join)
        self._thread = None

    def generate(self, request: GenerationRequest) -> GenerationStream:
        """Queue ``request`` and return its stream; raises :class:`PromptTooLong` at once."""
        params = request.params
        prompt_ids = self._encode(request.messages)
        limit = self.context_len - params.max_new_tokens
        if len(prompt_ids) > limit:
            raise PromptTooLong(
                f"prompt has {len(prompt_ids)} tokens; at most {max(limit, 0)} fit with "
                f"max_new_tokens={params.max_new_tokens} in a context of {self.context_len}"
            )
        stream = QueueStream(request.request_id)
        stream.prompt_tokens = len(prompt_ids)
        seq = _Sequence(
            stream=stream,
            prompt_ids=prompt_ids,
            params=params,
            ignore_eos=request.ignore_eos,
            detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_ids),
            stop=StopMatcher(params.stop),
            session_key=request.session_key,
        )
        self._ensure_thread()
        with self._cond:
            self._pending.append(seq)
            self._cond.notify()
        return stream

    def render_prompt(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt text from the tokenizer's chat template (with the generation prompt)."""
        conversation = list(messages)
        if self.system_prompt and not any(m.get("role") == "system" for m in conversation):
            conversation.insert(0, {"role": "system", "content": self.system_prompt})
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        lines = [f"{m['role']}: {m['content']}" for m in conversation]
        return "\n".join([*lines, "assistant:"])

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """Number of prompt tokens for ``messages``."""
        return len(self._encode(messages))

    @property
    def prefix_cache_tokens(self) -> int:
        """Tokens whose keys and values the prefix cache holds now."""
        return self._prefix.tokens if self._prefix is not None else 0

    def release_session(self, session_key: str) -> int:
        """Free the prefix cache entries only ``session_key``'s requests produced (its context was cleared).

        Entries another conversation also produced stay. Returns the number of tokens freed.
        """
        return self._prefix.release(session_key) if self._prefix is not None else 0

    # -- internals (event loop side) ---------------------------------------------------------

    def _encode(self, messages: Sequence[ChatMessage]) -> list[int]:
        return list(self.tokenizer(self.render_prompt(messages), add_special_tokens=False)["input_ids"])

    def _make_prefix_cache(self, enabled: bool, memory: float) -> PrefixCache | None:
        if not enabled:
            return None
        try:
            layout = self._layout or KVLayout.of(self.model.config, self.model.dtype)
        except UnsupportedModel as exc:
            logger.warning("prefix cache off: %s", exc)
            return None
        return PrefixCache(int(memory * 2**30) // layout.bytes_per_token)

    def _find_eos_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        sources = (
            self.tokenizer.eos_token_id,
            getattr(getattr(self.model, "generation_config", None), "eos_token_id", None),
            getattr(self.model.config, "eos_token_id", None),
        )
        for value in sources:
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(v for v in value if isinstance(v, int))
        return frozenset(ids)

    def _ensure_thread(self) -> None:
        with self._cond:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name=f"chatstream-engine-{self.model_name}", daemon=True)
            self._thread.start()

    # -- generation thread -------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            try:
                self._prepare()
            except BaseException as exc:
                logger.exception("engine %s failed to start", self.model_name)
                self._start_error = exc
                self._ready.set()
                self._stopping = True
            else:
                self._ready.set()
                logger.info("engine %s started on %s", self.model_name, self.device)
            while True:
                with self._cond:
                    while not (self._pending or self._active or self._prefilling or self._stopping):
                        self._cond.wait()
                    if self._stopping:
                        break
                    rows = self._static_kv.rows if self._static_kv is not None else self.max_batch_size
                    room = rows - len(self._active) - len(self._prefilling)
                    admitted = [self._pending.popleft() for _ in range(min(room, len(self._pending)))]
                try:
                    self._iteration(admitted)
                except Exception as exc:  # a bug outside the guarded steps: fail the batch, keep serving
                    logger.exception("engine step failed")
                    self._fail_all([*self._active, *self._prefilling, *admitted], exc)
                    self._prefilling = deque()
        self._close_all()
        logger.info("engine %s stopped", self.model_name)

    def _prepare(self) -> None:
        """On the static path: allocate the cache from the budget, capture the decode and prefill graphs."""
        if not self.static or self._static_kv is not None:
            return
        assert self._layout is not None
        rows = plan_rows(self._layout, self.context_len, self.max_batch_size, self.device, **self._budget)
        self._static_kv = StaticKVCache(self._layout, rows, self.context_len, self.device)
        logger.info(
            "KV cache: %d rows x %d tokens = %d tokens, %.2f GiB (%d bytes a token)%s",
            rows,
            self.context_len,
            rows * self.context_len,
            self._static_kv.nbytes / 2**30,
            self._layout.bytes_per_token,
            "" if rows == self.max_batch_size else f"; the budget caps the batch below {self.max_batch_size}",
        )
        kv, pad, graphs = self._static_kv, self._pad_id, self.cuda_graphs
        self._runner = DecodeRunner(self._call_model, kv, pad, use_graphs=graphs)
        self._prefill_runner = PrefillRunner(
            self._call_model, self._run_model, kv, pad, use_graphs=graphs, chunk=self.max_prefill_tokens
        )
        if self._runner.shapes:
            capture_all([self._runner, self._prefill_runner], self.device)

    def _iteration(self, admitted: list[_Sequence]) -> None:
        """One loop turn: prefill arrivals (one hand-off), then one decode step (one hand-off)."""
        outbox = _Outbox()
        waiting = []
        for seq in admitted:
            if seq.stream.cancelled:
                self._finish(seq, "cancelled", outbox)
            else:
                self._match_prefix(seq)
                waiting.append(seq)
        if self.static:
            self._prefilling.extend(waiting)
            for seq in self._prefilling:
                if seq.stream.cancelled:
                    self._finish(seq, "cancelled", outbox)
            self._prefilling = deque(s for s in self._prefilling if s.finish is None)
            if self._prefilling:
                self._prefill_chunks(outbox)
                self._retire(outbox)
                outbox.flush()
        elif waiting:
            self._prefill(waiting, outbox)
            self._retire(outbox)
            outbox.flush()
        if self._active:
            for seq in self._active:
                if seq.stream.cancelled:
                    self._finish(seq, "cancelled", outbox)
            self._retire(outbox)
        if self._active:
            self._decode(outbox)
            self._retire(outbox)
        outbox.flush()

    def _match_prefix(self, seq: _Sequence) -> None:
        """Look ``seq``'s prompt up in the prefix cache; count reused and prefilled tokens."""
        if self._prefix is not None:
            seq.prefix, seq.reused = self._prefix.match(seq.prompt_ids)
            if self.static:
                seq.cached = seq.reused
        seq.stream.cached_tokens = seq.reused
        self.prefix_hit_tokens += seq.reused
        self.prefill_tokens += len(seq.prompt_ids) - seq.reused

    def _prefill(self, seqs: list[_Sequence], outbox: _Outbox) -> None:
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
            logits, layers = self._forward_prefill(input_ids, mask, positions, self._past_layers(seqs, past))
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
                self._fail(seq, exc, outbox)
            return
        self._active.extend(seqs)
        self._accept(seqs, tokens.tolist(), outbox)

    def _prefill_chunks(self, outbox: _Outbox) -> None:
        """Static path: one prefill forward between two decode steps, oldest prompts first.

        Each prompt contributes at most ``max_prefill_tokens`` tokens to it. A partly prefilled
        prompt continues alone; new prompts are batched while the padded batch still fits one
        captured prefill graph (a replay costs about the same for any of its shapes). Sequences
        whose prompt completes join the batch at rows ``n, n+1, ...`` (their slots); at most one,
        the last, stays partly prefilled, in the top slot, until a later turn.
        """
        kv = self._static_kv
        assert kv is not None
        assert self._prefill_runner is not None
        limit = self.max_prefill_tokens or self.context_len
        chunks: list[tuple[_Sequence, int, int]] = []
        for seq in self._prefilling:
            take = min(len(seq.prompt_ids) - seq.cached, limit)
            width = max([take, *(t for _, _, t in chunks)])
            if chunks and (seq.cached or not self._prefill_runner.batchable(len(chunks) + 1, width)):
                break
            chunks.append((seq, seq.cached, take))
            if seq.cached or seq.cached + take < len(seq.prompt_ids):
                break  # a continued chunk runs alone; at most one prompt is left partly prefilled
        first_row = len(self._active)
        done = [seq for seq, start, take in chunks if start + take == len(seq.prompt_ids)]
        for i, (seq, _, _) in enumerate(chunks):
            target = first_row + i if i < len(done) else kv.rows - 1
            if seq.slot >= 0:
                kv.move(seq.slot, target, seq.cached)
            elif seq.prefix is not None:
                for buf, held in zip((*kv.keys, *kv.values), (*seq.prefix.keys, *seq.prefix.values), strict=True):
                    buf[target, :, : seq.reused] = held[:, : seq.reused]
                seq.prefix = None
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
                sampler = self._get_sampler(logits.shape[-1])
                sampler.add_rows([s.params for s in done], [s.prompt_ids for s in done])
                tokens = sampler.sample(logits[: len(done)], slice(first_row, first_row + len(done)))
        except Exception as exc:
            logger.exception("prefill of %d sequence(s) failed", len(chunks))
            if self._sampler is not None:
                self._sampler.keep_rows(range(min(first_row, len(self._sampler))))
            for seq, _, _ in chunks:
                self._fail(seq, exc, outbox)
            self._prefilling = deque(s for s in self._prefilling if s.finish is None)
            return
        for seq, start, take in chunks:
            seq.cached = start + take
        for _ in done:
            self._prefilling.popleft()
        self._active.extend(done)
        if done:
            self._accept(done, tokens.tolist(), outbox)

    def _decode(self, outbox: _Outbox) -> None:
        """One token for every active row (on the static path: steps until the batch must change)."""
        rows = self._active
        if self.static:
            try:
                self._decode_ahead(rows, outbox)
            except Exception as exc:
                logger.exception("decode step over %d sequence(s) failed", len(rows))
                self._fail_all(rows, exc, outbox)
            return
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
        self._accept(rows, tokens.tolist(), outbox)

    def _decode_ahead(self, rows: list[_Sequence], outbox: _Outbox) -> None:
        """Decode steps over ``rows``, each queued on the device before the host reads the one before.

        While the host detokenizes and delivers step ``k``, the device already runs step ``k + 1``
        on step ``k``'s sampled tokens (they never leave the device), so host work overlaps device
        work. Step ``k + 1`` is queued only when no row can reach its length limit at step ``k`` and
        nothing waits to change the batch; if step ``k`` finishes a row or something starts waiting,
        the loop reads step ``k + 1`` for the rows still running and returns, so rows leave and join
        between steps as on the eager path.
        """
        pending = self._launch(rows, first=True)
        while True:
            ahead = self._launch(rows, first=False) if self._can_run_ahead(rows) else None
            self._accept(rows, pending(), outbox)
            outbox.flush()
            if ahead is None:
                return
            if any(s.finish is not None for s in rows) or not self._can_run_ahead(rows, ahead=False):
                live = [(s, t) for s, t in zip(rows, ahead(), strict=True) if s.finish is None]
                if live:
                    self._accept([s for s, _ in live], [t for _, t in live], outbox)
                outbox.flush()
                return
            pending = ahead

    def _launch(self, rows: list[_Sequence], *, first: bool) -> Callable[[], list[int]]:
        """Queue one decode step and the sampling of its tokens; return the call that reads them.

        ``first``: the input tokens come from the host (the batch changed); else from the device,
        where the previous step's sampled tokens were fed back.
        """
        assert self._runner is not None and self._sampler is not None
        positions = torch.tensor([s.cached for s in rows], dtype=torch.long)
        input_ids = torch.tensor([[s.last_token] for s in rows], dtype=torch.long) if first else None
        for seq in rows:
            seq.cached += 1
        tokens = self._sampler.sample(self._forward_step(positions, input_ids))
        self._runner.feed(tokens)
        return self._runner.fetch(tokens)

    def _can_run_ahead(self, rows: list[_Sequence], *, ahead: bool = True) -> bool:
        """Whether the next step may be queued before this one is read (see :meth:`_decode_ahead`)."""
        kv = self._static_kv
        assert kv is not None
        if self._stopping or self._prefilling or (self._pending and len(rows) < kv.rows):
            return False
        if any(s.stream.cancelled for s in rows):
            return False
        return not ahead or all(s.generated + 1 < self._limit(s) for s in rows)

    def _limit(self, seq: _Sequence) -> int:
        """How many tokens ``seq`` may generate."""
        return min(seq.params.max_new_tokens, self.context_len - len(seq.prompt_ids))

    def _forward_prefill(self, *inputs: Any) -> Any:
        """The prefill forward of the engine's path (:meth:`PrefillRunner.run` or :meth:`_forward_prompts`)."""
        if self._prefill_runner is not None:
            return self._prefill_runner.run(*inputs)
        return self._forward_prompts(*inputs)

    def _past_layers(self, seqs: list[_Sequence], past: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the reused prefixes of ``seqs`` right-aligned in ``[rows, kv_heads, past, head_dim]``."""
        layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        if not past:
            return layers
        like = next(s.prefix for s in seqs if s.prefix is not None)
        for layer in range(len(like.keys)):
            pair = []
            for held in (like.keys[layer], like.values[layer]):
                heads, _, dim = held.shape
                pair.append(held.new_zeros((len(seqs), heads, past, dim)))
            for row, seq in enumerate(seqs):
                if seq.prefix is not None and seq.reused:
                    pair[0][row, :, past - seq.reused :] = seq.prefix.keys[layer][:, : seq.reused]
                    pair[1][row, :, past - seq.reused :] = seq.prefix.values[layer][:, : seq.reused]
            layers.append((pair[0], pair[1]))
        for seq in seqs:
            seq.prefix = None
        return layers

    def _forward_prompts(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        past: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Prefill left-padded prompts after ``past`` keys/values; return last-position logits and the layers."""
        cache = DynamicCache(config=self.model.config)
        for layer, (keys, values) in enumerate(past):
            cache.update(keys, values, layer)
        out = self._run_model(cache, input_ids=input_ids, attention_mask=mask, position_ids=positions, logits_to_keep=1)
        return out.logits[:, -1, :], [(layer.keys, layer.values) for layer in cache.layers]

    def _forward_step(self, first: torch.Tensor, *inputs: Any) -> torch.Tensor:
        """One decode forward over the whole batch; returns next-token logits ``[rows, vocab]``.

        ``first`` has one row per sequence. On the static path the arguments are ``(positions,
        input_ids or None)``, host tensors for :meth:`DecodeRunner.step`; else ``(input_ids,
        attention_mask, position_ids)`` over the eager cache.
        """
        if self._runner is not None:
            return self._runner.step(first, *inputs)
        input_ids, (mask, positions) = first, inputs
        cache = self._kv.as_transformers_cache()
        out = self._run_model(cache, input_ids=input_ids, attention_mask=mask, position_ids=positions)
        return out.logits[:, -1, :]

    def _run_model(self, cache: Any, **inputs: Any) -> Any:
        """The model's forward with ``cache``, under the engine's attention kernels (variable shapes)."""
        with self._attention():
            return self._call_model(cache, **inputs)

    def _call_model(self, cache: Any, **inputs: Any) -> Any:
        """The model's forward with ``cache`` under PyTorch's own attention choice.

        For the static decode step: its shapes come in a few buckets, so cuDNN attention plans
        once per bucket (and within a CUDA graph, at capture only); it measured fastest there.
        """
        return self.model(use_cache=True, **inputs, **{self._cache_arg: cache})

    def _get_sampler(self, vocab_size: int) -> BatchSampler:
        if self._sampler is None:
            self._sampler = BatchSampler(vocab_size, self.device)
        return self._sampler

    def _accept(self, seqs: list[_Sequence], tokens: list[int], outbox: _Outbox) -> None:
        """Record one new token per sequence, detokenize them in one call, emit text, mark finishes."""
        for seq, token in zip(seqs, tokens, strict=True):
            seq.generated += 1
            seq.last_token = token
            seq.output.append(token)
            seq.detokenizer.tokens.append(token)
            if token in self.eos_token_ids and not seq.ignore_eos:
                seq.finish = "stop"
            elif seq.generated >= self._limit(seq):
                seq.finish = "length"
        windows = [w for seq in seqs for w in seq.detokenizer.windows()]
        texts = decode_windows(self.tokenizer, windows)
        for i, seq in enumerate(seqs):
            try:
                delta = seq.detokenizer.advance(texts[2 * i], texts[2 * i + 1])
                out = seq.stop.feed(delta)
                if seq.stop.stopped:
                    seq.finish = "stop"
                elif seq.finish is not None:
                    out += seq.stop.feed(seq.detokenizer.flush()) + seq.stop.flush()
            except Exception as exc:
                logger.exception("detokenizing %s failed", seq.stream.request_id)
                self._fail(seq, exc, outbox)
                continue
            outbox.add(seq.stream, seq.stream.push, out, completion_tokens=seq.generated)
            if seq.finish is not None:
                self._finish(seq, seq.finish, outbox)

    def _finish(self, seq: _Sequence, reason: FinishReason, outbox: _Outbox) -> None:
        seq.finish = reason
        outbox.add(
            seq.stream,
            seq.stream.finish,
            reason,
            prompt_tokens=len(seq.prompt_ids),
            completion_tokens=seq.generated,
        )

    def _fail(self, seq: _Sequence, exc: BaseException, outbox: _Outbox) -> None:
        seq.finish = "error"
        error = exc if isinstance(exc, EngineError) else EngineError(f"generation failed: {exc!r}")
        if error is not exc:
            error.__cause__ = exc
        outbox.add(seq.stream, seq.stream.fail, error)

    def _fail_all(self, seqs: Sequence[_Sequence], exc: BaseException, outbox: _Outbox | None = None) -> None:
        """Fail every given sequence and reset the batch (its cache state is unknown)."""
        box = outbox or _Outbox()
        for seq in seqs:
            if seq.finish is None:
                self._fail(seq, exc, box)
        self._active = []
        self._kv.clear()
        if self._sampler is not None:
            self._sampler.keep_rows([])
        if outbox is None:
            box.flush()

    def _retire(self, outbox: _Outbox) -> None:
        """Drop finished rows, filling the holes with rows from the end to move little cache."""
        rows = self._active
        gone = [i for i, s in enumerate(rows) if s.finish is not None]
        if not gone:
            return
        if self._prefix is not None:
            for i in gone:
                self._retain(rows[i], i)
        keep = len(rows) - len(gone)
        order = list(range(keep))
        movers = (i for i in range(keep, len(rows)) if rows[i].finish is None)
        for hole in (i for i in gone if i < keep):
            order[hole] = next(movers)
        self._active = [rows[i] for i in order]
        if self._static_kv is not None:
            self._static_kv.keep_rows(order, max((rows[i].cached for i in order), default=0))
            for row, seq in enumerate(self._active):
                seq.slot = row
        else:
            self._kv.keep_rows(order)
        if self._sampler is not None:
            self._sampler.keep_rows(order)

    def _retain(self, seq: _Sequence, row: int) -> None:
        """Copy a leaving row's keys and values into the prefix cache (not after a failure: unknown state)."""
        assert self._prefix is not None
        if seq.finish == "error":
            return
        if self._static_kv is not None:
            count = seq.cached
            keys = [buf[seq.slot, :, :count].clone() for buf in self._static_kv.keys]
            values = [buf[seq.slot, :, :count].clone() for buf in self._static_kv.values]
        else:
            kv = self._kv
            count = int(kv.positions[row])
            columns = kv.mask[row, : kv.length].bool()
            keys = [buf[row, :, : kv.length][:, columns] for buf in kv.keys]
            values = [buf[row, :, : kv.length][:, columns] for buf in kv.values]
        ids = [*seq.prompt_ids, *seq.output][:count]
        if len(ids) == count:
            self._prefix.insert(ids, keys, values, seq.session_key)

    def _close_all(self) -> None:
        """At shutdown: finish every running and waiting sequence with ``cancelled``."""
        outbox = _Outbox()
        with self._cond:
            waiting, self._pending = list(self._pending), deque()
        for seq in [*self._active, *self._prefilling, *waiting]:
            if seq.finish is None:
                self._finish(seq, "cancelled", outbox)
        self._active = []
        self._prefilling = deque()
        self._kv.clear()
        if self._sampler is not None:
            self._sampler.keep_rows([])
        outbox.flush()


def _attention_kernels(device: torch.device) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """The attention kernels to run the model's forwards under.

    On CUDA, PyTorch may pick cuDNN attention, which builds an execution plan for every new key
    length; the batch cache grows one column a step, so that cost (about 2 ms of CPU per layer on
    an H100) would come every step. Flash and memory-efficient attention have no such cost.
    """
    if device.type != "cuda":
        return contextlib.nullcontext
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: no cuDNN attention either
        return contextlib.nullcontext
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return lambda: sdpa_kernel(backends)


def _log_growing_cache(config: Any, itemsize: int, rows: int, context_len: int) -> None:
    """One line for the eager cache, which grows with the batch: its size a token and at most."""
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * kv_heads * head_dim * itemsize
    logger.info(
        "KV cache: %.0f KiB a token; it grows with the batch, at most %.2f GB (%d rows x %d tokens)",
        per_token / 1024, per_token * context_len * rows / 1e9, rows, context_len,
    )  # fmt: skip


def _forward_params(model: Any) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return frozenset()
