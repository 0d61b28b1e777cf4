"""A continuous-batching engine for Hugging Face transformers causal language models.

One generation thread per engine runs a loop of steps. Requests from :meth:`TransformersEngine.generate`
wait in a queue; at the start of a step the waiting ones are prefilled together and merged into the
running batch, then one decode forward produces one token for every row. Finished and cancelled rows
leave between steps. Each step's text deltas reach the event loop with one ``call_soon_threadsafe``.

On CPU (by default) :class:`BatchKVCache` grows with the batch (:mod:`.eager_steps`). On CUDA,
:class:`StaticKVCache` holds slots sized from a memory budget, and decode steps and prefill chunks
are replayed CUDA graphs (:mod:`.static_steps`, :mod:`.graph_runner`).

Importing this module imports torch and transformers; ``import chatstream_asgi`` does not.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch

from chatstream_asgi.engines.base import (
    ChatMessage,
    Engine,
    GenerationRequest,
    GenerationStream,
    PromptTooLong,
    QueueStream,
)
from chatstream_asgi.engines.transformers.batch_cache import BatchKVCache, log_growing_cache
from chatstream_asgi.engines.transformers.compiled_step import AUTO, compile_mode_for, compile_steps
from chatstream_asgi.engines.transformers.detokenizer import IncrementalDetokenizer, StopMatcher
from chatstream_asgi.engines.transformers.eager_steps import EagerSteps
from chatstream_asgi.engines.transformers.graph_runner import DecodeRunner, PrefillRunner, capture_all
from chatstream_asgi.engines.transformers.loading import (
    DEFAULT_MODEL,
    eos_token_ids,
    generation_defaults,
    indexed_device,
    load_model,
)
from chatstream_asgi.engines.transformers.model_runner import ModelRunner
from chatstream_asgi.engines.transformers.output import OutputProcessor, fail, finish
from chatstream_asgi.engines.transformers.prefix_cache import prefix_cache_for
from chatstream_asgi.engines.transformers.sampling import BatchSampler
from chatstream_asgi.engines.transformers.sequence import EngineSequence, Outbox
from chatstream_asgi.engines.transformers.session_turns import SessionTurns
from chatstream_asgi.engines.transformers.slot_prefix import SlotPrefixIndex
from chatstream_asgi.engines.transformers.static_cache import KVLayout, StaticKVCache, plan_rows
from chatstream_asgi.engines.transformers.static_steps import DEFAULT_PREFILL_CHUNK, StaticSteps

__all__ = ["TransformersEngine"]

logger = logging.getLogger("chatstream_asgi.engine")


class TransformersEngine(EagerSteps, StaticSteps, Engine):
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
    fewer. ``cuda_graphs=False`` runs its steps eagerly (for debugging). ``compile_mode`` fuses the
    captured decode step's layers with ``torch.compile`` where that measures faster (``"auto"``, the
    default: wherever steps are captured, about 90 s at the first start and 30 s after; an inductor
    mode, or True for the default one; None: off; see
    :mod:`~chatstream_asgi.engines.transformers.compiled_step`). ``max_prefill_tokens``
    caps the prompt tokens prefilled beside one decode step while rows are running (static cache
    only; ``None``: no cap); an idle engine prefills a prompt whole. ``kv_cache_usage`` is the
    share of the slots in use.

    Prefix reuse (``prefix_cache``, on by default): the keys and values of finished sequences are
    kept, and a prompt that begins with held token ids prefills only the rest. On the static cache
    they stay in the slots the sequences leave, evicted whenever a running request needs the slot (see
    :mod:`~chatstream_asgi.engines.transformers.slot_prefix`); on the growing cache they are copied
    into a pool of ``prefix_cache_memory`` GiB (default 1; see
    :mod:`~chatstream_asgi.engines.transformers.prefix_cache`). A conversation's next prompt is built
    from its last turn's token ids (:mod:`~chatstream_asgi.engines.transformers.session_turns`).
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
        compile_mode: str | bool | None = AUTO,
        kv_cache_memory: float | None = None,
        gpu_memory_utilization: float | None = None,
        max_prefill_tokens: int | None = DEFAULT_PREFILL_CHUNK,
        prefix_cache: bool = True,
        prefix_cache_memory: float = 1.0,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = indexed_device(device)
        config = model.config
        self.model_name: str = name or getattr(config, "name_or_path", "") or type(model).__name__
        self.context_len: int = context_len or getattr(config, "max_position_embeddings", None) or 2048
        self.max_batch_size = max_batch_size
        self.system_prompt = system_prompt
        self.default_generation_params: dict[str, float] = generation_defaults(model)
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self._pad_id: int = pad if pad is not None else min(self.eos_token_ids, default=0)
        self._num_layers: int = config.get_text_config().num_hidden_layers
        self._model_runner = ModelRunner(model, self.device)
        self._output = OutputProcessor(tokenizer, self.eos_token_ids, self.context_len)
        self.static = self.device.type == "cuda" if static_cache is None else static_cache
        self.cuda_graphs = cuda_graphs
        self.compile_mode = compile_mode_for(compile_mode, self.device, self.static and cuda_graphs)
        self.max_prefill_tokens = max_prefill_tokens
        self._budget = {"kv_cache_memory": kv_cache_memory, "gpu_memory_utilization": gpu_memory_utilization}
        self._layout = KVLayout.of(config, model.dtype) if self.static else None
        if not self.static:
            log_growing_cache(config.get_text_config(), model.dtype.itemsize, max_batch_size, self.context_len)
        self._ready = threading.Event()
        self._start_error: BaseException | None = None

        self._cond = threading.Condition()
        self._pending: deque[EngineSequence] = deque()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Owned by the generation thread:
        self._active: list[EngineSequence] = []
        self._prefilling: deque[EngineSequence] = deque()  # admitted, prompt not fully in the cache (static path)
        self._kv = BatchKVCache(self._num_layers, row_capacity=max_batch_size)
        self._static_kv: StaticKVCache | None = None
        self._runner: DecodeRunner | None = None
        self._prefill_runner: PrefillRunner | None = None
        self._sampler: BatchSampler | None = None
        self._prefix = (
            prefix_cache_for(config, model.dtype, prefix_cache_memory) if prefix_cache and not self.static else None
        )
        self._slot_prefix = SlotPrefixIndex() if prefix_cache and self.static else None
        self._turns = SessionTurns(tokenizer)
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
        params, text = request.params, request.prompt or self.render_prompt(request.messages)  # rendered once
        limit = self.context_len - params.max_new_tokens
        prompt_ids = self._turns.encode(text, request.session_key, limit)
        if len(prompt_ids) > limit:
            raise PromptTooLong(
                f"prompt has {len(prompt_ids)} tokens; at most {max(limit, 0)} fit with "
                f"max_new_tokens={params.max_new_tokens} in a context of {self.context_len}"
            )
        stream = QueueStream(request.request_id)
        stream.prompt_tokens = len(prompt_ids)
        seq = EngineSequence(
            stream=stream,
            prompt_ids=prompt_ids,
            params=params,
            ignore_eos=request.ignore_eos,
            detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_ids),
            stop=StopMatcher(params.stop),
            session_key=request.session_key,
            turns=self._turns,
            prompt_text=text,
        )
        self._ensure_thread()
        with self._cond:
            self._pending.append(seq)
            self._cond.notify()
        return stream

    def render_prompt(self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool = True) -> str:
        """The prompt text from the tokenizer's chat template (with the generation prompt unless told not to)."""
        conversation = list(messages)
        if self.system_prompt and not any(m.get("role") == "system" for m in conversation):
            conversation.insert(0, {"role": "system", "content": self.system_prompt})
        if getattr(self.tokenizer, "chat_template", None):
            render = self.tokenizer.apply_chat_template
            return render(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
        lines = [f"{m['role']}: {m['content']}" for m in conversation]
        return "\n".join([*lines, "assistant:"] if add_generation_prompt else lines)

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """Number of prompt tokens for ``messages``."""
        return len(self._encode(messages))

    @property
    def prefix_cache_tokens(self) -> int:
        """Tokens whose keys and values the prefix cache (or the retained slots) hold now."""
        held = self._prefix if self._prefix is not None else self._slot_prefix
        return held.tokens if held is not None else 0

    def release_session(self, session_key: str) -> int:
        """Free what ``session_key``'s requests left (its context was cleared): its last turn's ids, and the
        prefix entries or retained slots only it produced. Returns the number of KV tokens freed.
        """
        self._turns.release(session_key)
        held = self._prefix if self._prefix is not None else self._slot_prefix
        return held.release(session_key) if held is not None else 0

    # -- internals (event loop side) ---------------------------------------------------------

    def _encode(self, messages: Sequence[ChatMessage]) -> list[int]:
        return self._turns.tokenize(self.render_prompt(messages))

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
                if self.device.type == "cuda":  # the thread's current device: graph capture and kernels run there
                    torch.cuda.set_device(self.device)
                self._prepare()
            except BaseException as exc:
                logger.exception("engine %s failed to start", self.model_name)
                self._start_error = exc
                self._ready.set()
                self._stopping = True
            else:
                self._ready.set()
                reuse = "off" if self._prefix is None and self._slot_prefix is None else "on"
                logger.info("engine %s started on %s; prefix reuse %s", self.model_name, self.device, reuse)
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
        model = self._model_runner
        self._runner = DecodeRunner(model.call, kv, pad, use_graphs=graphs)
        self._prefill_runner = PrefillRunner(
            model.call, model.run, kv, pad, use_graphs=graphs, chunk=self.max_prefill_tokens
        )
        if self._runner.shapes:
            if self.compile_mode:
                compile_steps(self._runner, self._prefill_runner, self.model, self.device, self.compile_mode)
            capture_all([self._runner, self._prefill_runner], self.device)

    def _iteration(self, admitted: list[EngineSequence]) -> None:
        """One loop turn: prefill arrivals (one hand-off), then one decode step (one hand-off).

        On the static path with rows running, a prompt chunk and one decode step share the turn
        (:meth:`StaticSteps._prefill_turn`).
        """
        outbox = Outbox()
        waiting = []
        for seq in admitted:
            if seq.stream.cancelled:
                finish(seq, "cancelled", outbox)
            else:
                if not self.static:  # the static path matches when it places the prompt in a slot
                    self._match_prefix(seq)
                waiting.append(seq)
        for seq in self._active:
            if seq.stream.cancelled:
                finish(seq, "cancelled", outbox)
        self._retire(outbox)
        if self.static:
            decoded = self._prefill_turn(waiting, outbox)
            self._retire(outbox)
            outbox.flush()
            if decoded:
                return
        elif waiting:
            self._prefill(waiting, outbox)
            self._retire(outbox)
            outbox.flush()
        if self._active:
            self._decode(outbox)
            self._retire(outbox)
        outbox.flush()

    def _count_prompt(self, seq: EngineSequence) -> None:
        """Count ``seq``'s reused and prefilled prompt tokens, once, when its prefill starts."""
        seq.stream.cached_tokens = seq.reused
        self.prefix_hit_tokens += seq.reused
        self.prefill_tokens += len(seq.prompt_ids) - seq.reused

    def _decode(self, outbox: Outbox) -> None:
        """One token for every active row (on the static path: steps until the batch must change)."""
        rows = self._active
        if self.static:
            try:
                self._decode_ahead(rows, outbox)
            except Exception as exc:
                logger.exception("decode step over %d sequence(s) failed", len(rows))
                self._fail_all(rows, exc, outbox)
            return
        self._decode_step(rows, outbox)

    def _forward_prefill(self, *inputs: Any) -> Any:
        """The prefill forward of the engine's path (:meth:`PrefillRunner.run` or :meth:`ModelRunner.prefill`)."""
        if self._prefill_runner is not None:
            return self._prefill_runner.run(*inputs)
        return self._model_runner.prefill(*inputs)

    def _forward_step(self, first: torch.Tensor, *inputs: Any) -> torch.Tensor:
        """One decode forward over the whole batch; returns next-token logits ``[rows, vocab]``.

        ``first`` has one row per sequence. On the static path the arguments are ``(positions,
        input_ids or None)``, host tensors for :meth:`DecodeRunner.step`; else ``(input_ids,
        attention_mask, position_ids)`` over the eager cache.
        """
        if self._runner is not None:
            return self._runner.step(first, *inputs)
        mask, positions = inputs
        return self._model_runner.step(self._kv.as_transformers_cache(), first, mask, positions)

    def _get_sampler(self, vocab_size: int) -> BatchSampler:
        if self._sampler is None:
            self._sampler = BatchSampler(vocab_size, self.device)
        return self._sampler

    def _fail_all(self, seqs: Sequence[EngineSequence], exc: BaseException, outbox: Outbox | None = None) -> None:
        """Fail every given sequence and reset the batch (its cache state is unknown)."""
        box = outbox or Outbox()
        for seq in seqs:
            if seq.finish is None:
                fail(seq, exc, box)
        self._active = []
        self._kv.clear()
        if self._slot_prefix is not None:
            self._slot_prefix.clear()
        if self._sampler is not None:
            self._sampler.keep_rows([])
        if outbox is None:
            box.flush()

    def _retire(self, outbox: Outbox) -> None:
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
            self._compact(rows, order)
        else:
            self._kv.keep_rows(order)
        if self._sampler is not None:
            self._sampler.keep_rows(order)

    def _close_all(self) -> None:
        """At shutdown: finish every running and waiting sequence with ``cancelled``."""
        outbox = Outbox()
        with self._cond:
            waiting, self._pending = list(self._pending), deque()
        for seq in [*self._active, *self._prefilling, *waiting]:
            if seq.finish is None:
                finish(seq, "cancelled", outbox)
        self._active = []
        self._prefilling = deque()
        self._kv.clear()
        if self._slot_prefix is not None:
            self._slot_prefix.clear()
        if self._sampler is not None:
            self._sampler.keep_rows([])
        outbox.flush()
