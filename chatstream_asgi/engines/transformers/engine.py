"""A continuous-batching engine for Hugging Face transformers causal language models.

One generation thread per engine runs a loop of steps. Requests from :meth:`TransformersEngine.generate`
wait in a queue; at the start of a step the waiting ones are prefilled together and merged into the
running batch (:class:`~chatstream_asgi.kv_cache.BatchKVCache`), then one decode forward produces one
token for every row. Finished and cancelled rows leave between steps. Each step's text deltas are
handed to the event loop with one ``call_soon_threadsafe`` per loop, where they are pushed into the
requests' :class:`~chatstream_asgi.engine.QueueStream`.

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
from dataclasses import dataclass
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
from chatstream_asgi.engines.transformers.loading import DEFAULT_MODEL, generation_defaults, load_model
from chatstream_asgi.engines.transformers.sampling import BatchSampler

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

        self._cond = threading.Condition()
        self._pending: deque[_Sequence] = deque()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Owned by the generation thread:
        self._active: list[_Sequence] = []
        self._kv = BatchKVCache(self._num_layers, row_capacity=max_batch_size)
        self._sampler: BatchSampler | None = None

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
        """Start the generation thread (idempotent)."""
        self._ensure_thread()

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

    # -- internals (event loop side) ---------------------------------------------------------

    def _encode(self, messages: Sequence[ChatMessage]) -> list[int]:
        return list(self.tokenizer(self.render_prompt(messages), add_special_tokens=False)["input_ids"])

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
        logger.info("engine %s started on %s", self.model_name, self.device)
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not (self._pending or self._active or self._stopping):
                        self._cond.wait()
                    if self._stopping:
                        break
                    room = self.max_batch_size - len(self._active)
                    admitted = [self._pending.popleft() for _ in range(min(room, len(self._pending)))]
                try:
                    self._iteration(admitted)
                except Exception as exc:  # a bug outside the guarded steps: fail the batch, keep serving
                    logger.exception("engine step failed")
                    self._fail_all([*self._active, *admitted], exc)
        self._close_all()
        logger.info("engine %s stopped", self.model_name)

    def _iteration(self, admitted: list[_Sequence]) -> None:
        """One loop turn: prefill arrivals (one hand-off), then one decode step (one hand-off)."""
        outbox = _Outbox()
        waiting = []
        for seq in admitted:
            if seq.stream.cancelled:
                self._finish(seq, "cancelled", outbox)
            else:
                waiting.append(seq)
        if waiting:
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

    def _prefill(self, seqs: list[_Sequence], outbox: _Outbox) -> None:
        """Run the prompts of ``seqs`` together, sample their first tokens, merge them into the batch."""
        first_row = len(self._active)
        width = max(len(s.prompt_ids) for s in seqs)
        input_ids = torch.full((len(seqs), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            n = len(seq.prompt_ids)
            input_ids[row, width - n :] = torch.tensor(seq.prompt_ids, dtype=torch.long)
            mask[row, width - n :] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        try:
            logits, layers = self._forward_prefill(input_ids, mask)
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

    def _decode(self, outbox: _Outbox) -> None:
        """One token for every active row."""
        rows = self._active
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

    def _forward_prefill(
        self, input_ids: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Prefill left-padded prompts; return last-position logits and per-layer keys/values."""
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        out = self._run_model(cache, input_ids=input_ids, attention_mask=mask, position_ids=positions, logits_to_keep=1)
        return out.logits[:, -1, :], [(layer.keys, layer.values) for layer in cache.layers]

    def _forward_step(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One decode forward over the whole batch; returns next-token logits ``[rows, vocab]``.

        This is the one method a GPU variant replaces: with :class:`BatchKVCache` preallocated at
        ``max_batch_size`` rows and a fixed number of columns (it already writes in place), pad the
        rows to a few bucket sizes, copy inputs into static tensors and replay a CUDA graph captured
        per bucket instead of calling the model eagerly.
        """
        cache = self._kv.as_transformers_cache()
        out = self._run_model(cache, input_ids=input_ids, attention_mask=mask, position_ids=positions)
        return out.logits[:, -1, :]

    def _run_model(self, cache: Any, **inputs: Any) -> Any:
        """The model's forward with ``cache``, under the engine's attention kernels."""
        with self._attention():
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
            seq.detokenizer.tokens.append(token)
            if token in self.eos_token_ids and not seq.ignore_eos:
                seq.finish = "stop"
            elif seq.generated >= min(seq.params.max_new_tokens, self.context_len - len(seq.prompt_ids)):
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
        keep = len(rows) - len(gone)
        order = list(range(keep))
        movers = (i for i in range(keep, len(rows)) if rows[i].finish is None)
        for hole in (i for i in gone if i < keep):
            order[hole] = next(movers)
        self._active = [rows[i] for i in order]
        self._kv.keep_rows(order)
        if self._sampler is not None:
            self._sampler.keep_rows(order)

    def _close_all(self) -> None:
        """At shutdown: finish every running and waiting sequence with ``cancelled``."""
        outbox = _Outbox()
        with self._cond:
            waiting, self._pending = list(self._pending), deque()
        for seq in [*self._active, *waiting]:
            if seq.finish is None:
                self._finish(seq, "cancelled", outbox)
        self._active = []
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


def _forward_params(model: Any) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return frozenset()
