"""A continuous-batching engine for Hugging Face transformers causal language models.

One generation thread per engine runs a loop: admit waiting requests, plan a step (the running rows'
next tokens and a chunk of prompt tokens), run it (one forward), sample, hand the tokens' text to the
event loop with one ``call_soon_threadsafe``, retire finished rows. The forward belongs to the engine's
KV path (:mod:`~chatstream_asgi.engines.transformers.kv_path`): the slotted cache with CUDA graphs
(:mod:`~chatstream_asgi.engines.transformers.static_path`, the default on CUDA) or the growing cache
(:mod:`~chatstream_asgi.engines.transformers.eager_path`, the default on CPU). Where the path queues
its steps (the slotted cache), the loop queues the next step before it reads this one's tokens.

A model the slotted cache cannot hold runs on the growing cache, with one log line that says why, unless
``static_cache=True`` asked for the slotted one (then :class:`UnsupportedModel` is raised at once).

Importing this module imports torch and transformers; ``import chatstream_asgi`` does not.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import Sequence
from typing import Any

import torch

from chatstream_asgi.engines.base import (
    ChatMessage,
    Engine,
    GenerationParams,
    GenerationRequest,
    GenerationStream,
    PromptTooLong,
    QueueStream,
    ToolSpec,
    UnsupportedFeature,
)
from chatstream_asgi.engines.transformers.batch_cache import log_growing_cache
from chatstream_asgi.engines.transformers.compiled_step import AUTO, compile_mode_for
from chatstream_asgi.engines.transformers.core import EngineCore
from chatstream_asgi.engines.transformers.detokenizer import IncrementalDetokenizer, StopMatcher
from chatstream_asgi.engines.transformers.eager_path import EagerPath
from chatstream_asgi.engines.transformers.experts import prepare_experts
from chatstream_asgi.engines.transformers.grammar import Grammars
from chatstream_asgi.engines.transformers.kv_layout import KVLayout, UnsupportedModel
from chatstream_asgi.engines.transformers.kv_path import KVPath
from chatstream_asgi.engines.transformers.lean_model import LeanLlama
from chatstream_asgi.engines.transformers.loading import (
    DEFAULT_MODEL,
    eos_token_ids,
    generation_defaults,
    indexed_device,
    load_model,
    tool_call_format,
)
from chatstream_asgi.engines.transformers.model_runner import ModelRunner
from chatstream_asgi.engines.transformers.output import OutputProcessor
from chatstream_asgi.engines.transformers.prefix_cache import prefix_cache_for
from chatstream_asgi.engines.transformers.sequence import EngineSequence
from chatstream_asgi.engines.transformers.session_turns import SessionTurns
from chatstream_asgi.engines.transformers.static_path import DEFAULT_PREFILL_CHUNK, StaticPath

__all__ = ["TransformersEngine", "UnsupportedModel", "slotted_layout"]

logger = logging.getLogger("chatstream_asgi.engine")


def slotted_layout(
    config: Any, dtype: torch.dtype, device: torch.device, static_cache: bool | None, name: str
) -> KVLayout | None:
    """The slotted cache's layout where that path is taken (``static_cache``; by default on CUDA), else None.

    A model whose layers the slotted cache cannot hold runs on the growing cache instead, with one warning
    that says why; unless ``static_cache=True`` asked for the slotted one: then :class:`UnsupportedModel`.
    """
    if static_cache is False or (static_cache is None and device.type != "cuda"):
        return None
    try:
        return KVLayout.of(config, dtype)
    except UnsupportedModel as exc:
        if static_cache:
            raise
        logger.warning("engine %s runs on the growing cache (no CUDA graphs): %s", name, exc)
        return None


class TransformersEngine(Engine):
    """Continuous-batching engine over a transformers causal LM (see the module docstring).

    ``model`` and ``tokenizer`` are a loaded transformers model (or ``load_model``'s
    :class:`~.lean_model.LeanLlama`, which runs on the growing cache) and tokenizer; ``context_len``
    defaults to the model's ``max_position_embeddings``; at most ``max_batch_size`` sequences
    decode together (others wait). ``system_prompt``, if set, is prepended to conversations
    without a system message. ``default_generation_params`` is the sampling that suits the model (its
    generation config, or a known alias's recommended values): ``ChatStream`` uses it for the values it
    is not given.

    GPU options (see the module docstring): ``static_cache`` (default: on CUDA, where the model's layers
    fit it) selects the preallocated slotted cache, sized by ``kv_cache_memory`` (GiB) or
    ``gpu_memory_utilization`` (a fraction of the card, like vLLM's); fewer rows than ``max_batch_size``
    when the budget holds fewer. ``cuda_graphs=False`` runs its steps eagerly (for debugging); where the
    capture fails they run eagerly too, with a warning (``static_cache=True``: the start fails).
    ``compile_mode`` fuses the captured steps' layers with ``torch.compile`` where that measures faster
    (``"auto"``, the default: wherever steps are captured, about 90 s at the first start and 30 s after;
    an inductor mode, or True for the default one; None: off; see
    :mod:`~chatstream_asgi.engines.transformers.compiled_step`). ``max_prefill_tokens`` caps the prompt
    tokens that go into one step beside the running rows' decode tokens, in the same forward (static
    cache only; ``None``: no cap); an idle engine packs as many prompts as a step holds.
    ``kv_cache_usage`` is the share of the slots in use.

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
        self.where = str(self.device)
        config = model.config
        self.model_name: str = name or getattr(config, "name_or_path", "") or type(model).__name__
        self.context_len: int = context_len or getattr(config, "max_position_embeddings", None) or 2048
        self.max_batch_size = max_batch_size
        self.system_prompt = system_prompt
        self.default_generation_params: dict[str, float] = generation_defaults(model)
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self._pad_id: int = pad if pad is not None else min(self.eos_token_ids, default=0)
        self._output = OutputProcessor(tokenizer, self.eos_token_ids, self.context_len)
        if static_cache and isinstance(model, LeanLlama):
            raise UnsupportedModel(f"{self.model_name}: the slotted cache runs transformers' forward, which a model "
                                   "loaded without it lacks: load it with load_model(..., lean=False)")  # fmt: skip
        layout = slotted_layout(config, model.dtype, self.device, static_cache, self.model_name)
        self.static = layout is not None
        self.cuda_graphs = cuda_graphs
        self.compile_mode = compile_mode_for(compile_mode, self.device, self.static and cuda_graphs)
        prepare_experts(model, self.device, graphs=self.static and cuda_graphs and self.device.type == "cuda")
        runner = ModelRunner(model, self.device)
        self._path: KVPath
        if layout is not None:
            self._path = StaticPath(
                runner,
                layout,
                device=self.device,
                context_len=self.context_len,
                max_rows=max_batch_size,
                pad_id=self._pad_id,
                budget={"kv_cache_memory": kv_cache_memory, "gpu_memory_utilization": gpu_memory_utilization},
                cuda_graphs=cuda_graphs,
                compile_mode=self.compile_mode,
                max_prefill_tokens=max_prefill_tokens,
                prefix_cache=prefix_cache,
                strict=static_cache is True,
                forward_step=lambda *a: self._forward_step(*a),
                forward_prefill=lambda *a: self._forward_prefill(*a),
            )
        else:
            text = config.get_text_config()
            log_growing_cache(text, model.dtype.itemsize, max_batch_size, self.context_len)
            self._path = EagerPath(
                runner,
                text.num_hidden_layers,
                max_batch_size,
                self._pad_id,
                prefix_cache_for(config, model.dtype, prefix_cache_memory) if prefix_cache else None,
                forward_step=lambda *a: self._forward_step(*a),
                forward_prefill=lambda *a: self._forward_prefill(*a),
            )
        vocab = model.get_output_embeddings().out_features  # a quantized head keeps no float weight
        self._core = EngineCore(self._path, self._output, self.device, vocab, self.model_name)
        self._grammars = Grammars(tokenizer, self.eos_token_ids, vocab)
        self.tool_call_format = tool_call_format(tokenizer)
        self._cond = self._core.cond  # queue several requests at once: hold it while calling generate()
        self._thread: threading.Thread | None = None
        self._turns = SessionTurns(tokenizer)

    @property
    def max_prefill_tokens(self) -> int | None:
        """Prompt tokens a step takes beside running rows (the slotted cache; read at every step)."""
        return self._path.max_prefill_tokens if isinstance(self._path, StaticPath) else None

    @max_prefill_tokens.setter
    def max_prefill_tokens(self, value: int | None) -> None:
        if isinstance(self._path, StaticPath):
            self._path.max_prefill_tokens = value

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str = DEFAULT_MODEL,
        device: str | None = None,
        dtype: Any = None,
        quantization: str | None = None,
        **kw: Any,
    ) -> TransformersEngine:
        """Load a model (``"smollm2"``, a directory, a hub id; ``quantization``: see ``load_model``) into an engine.

        With ``static_cache=True`` the model is transformers' model class (``load_model(..., lean=False)``)."""
        lean = kw.get("static_cache") is not True
        model, tokenizer, display_name = load_model(name_or_path, device, dtype, quantization, lean=lean)
        kw.setdefault("name", display_name)
        engine = cls(model, tokenizer, model.device, **kw)
        engine.default_generation_params = generation_defaults(model, name_or_path)
        return engine

    # -- Engine protocol ---------------------------------------------------------------------

    async def start(self) -> None:
        """Start the generation thread and wait until it is ready (cache allocated, graphs captured)."""
        self._ensure_thread()
        await asyncio.to_thread(self._core.ready.wait)
        if self._core.start_error is not None:
            raise self._core.start_error

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of the slotted cache's slots held by running or prefilling sequences (0 without one)."""
        return self._path.usage(self._core.busy)

    @property
    def prefix_hit_tokens(self) -> int:
        """Prompt tokens whose keys and values came from a kept prefix."""
        return self._core.prefix_hit_tokens

    @property
    def prefill_tokens(self) -> int:
        """Prompt tokens computed."""
        return self._core.prefill_tokens

    async def shutdown(self) -> None:
        """Stop the generation thread; open streams finish with ``cancelled``."""
        thread = self._thread
        if thread is None:
            return
        self._core.stop()
        await asyncio.to_thread(thread.join)
        self._thread = None

    def prepare(self, request: GenerationRequest) -> GenerationRequest:
        """``request`` with its prompt rendered (unless given) and tokenized: the session's last ids where
        the prompt continues them (see :mod:`.session_turns`). Thread-safe (see :meth:`Engine.prepare`).
        Ids without their text are tokenized again: the text is what the session's next turn is matched on."""
        if request.prompt_ids is not None and request.prompt is not None:
            return request
        text = request.prompt or self.render_prompt(request.messages)
        limit = self.context_len - request.params.max_new_tokens
        ids = tuple(self._turns.encode(text, request.session_key, limit))
        return dataclasses.replace(request, prompt=text, prompt_ids=ids)

    def generate(self, request: GenerationRequest) -> GenerationStream:
        """Queue ``request`` and return its stream; raises :class:`PromptTooLong` at once. A request that
        :meth:`prepare` has not seen is prepared here, on the caller's thread."""
        request = self.prepare(request)
        params, text, prompt_ids = request.params, request.prompt or "", list(request.prompt_ids or ())
        limit = self.context_len - params.max_new_tokens
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
            grammar=self._grammars.matcher(params.json_schema) if params.json_schema is not None else None,
        )
        self._ensure_thread()
        self._core.submit(seq)
        return stream

    def render_prompt(
        self,
        messages: Sequence[ChatMessage],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[ToolSpec] | None = None,
    ) -> str:
        """The prompt text from the tokenizer's chat template (with the generation prompt unless told not to),
        ``tools`` rendered by the template."""
        conversation = list(messages)
        if self.system_prompt and not any(m.get("role") == "system" for m in conversation):
            conversation.insert(0, {"role": "system", "content": self.system_prompt})
        if getattr(self.tokenizer, "chat_template", None):
            render = self.tokenizer.apply_chat_template
            extra = {"tools": list(tools)} if tools else {}
            return render(conversation, tokenize=False, add_generation_prompt=add_generation_prompt, **extra)
        lines = [f"{m['role']}: {m['content']}" for m in conversation]
        return "\n".join([*lines, "assistant:"] if add_generation_prompt else lines)

    def count_tokens(self, messages: Sequence[ChatMessage], *, tools: Sequence[ToolSpec] | None = None) -> int:
        """Number of prompt tokens for ``messages`` (and ``tools``)."""
        return len(self._encode(messages, tools))

    def check_params(self, params: GenerationParams) -> None:
        """Compile ``params.json_schema`` (kept for :meth:`generate`; the first call also reads the tokenizer
        into the grammar library, about a second); :class:`UnsupportedFeature` names what is wrong."""
        if params.json_schema is not None:
            try:
                self._grammars.check(params.json_schema)
            except UnsupportedFeature as exc:
                exc.param = exc.param or "response_format"
                raise

    @property
    def prefix_cache_tokens(self) -> int:
        """Tokens whose keys and values the prefix cache (or the retained slots) hold now."""
        return self._path.held_tokens

    def release_session(self, session_key: str) -> int:
        """Free what ``session_key``'s requests left (its context was cleared): its last turn's ids, and the
        prefix entries or retained slots only it produced. Returns the number of KV tokens freed.
        """
        self._turns.release(session_key)
        return self._path.release(session_key)

    # -- internals (event loop side) ---------------------------------------------------------

    def _encode(self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec] | None = None) -> list[int]:
        return self._turns.tokenize(self.render_prompt(messages, tools=tools))

    def _ensure_thread(self) -> None:
        with self._cond:
            if self._thread is not None and self._thread.is_alive():
                return
            self._core.stopping = False
            name = f"chatstream-engine-{self.model_name}"
            self._thread = threading.Thread(target=self._core.run, name=name, daemon=True)
            self._thread.start()

    # -- the forwards: every forward of either path goes through one of these (tests hook them) --

    def _forward_step(self, first: torch.Tensor, *args: Any) -> Any:
        """A forward with decode rows (``first`` has one row per running sequence): the path's step."""
        return self._path.run_step(first, *args)

    def _forward_prefill(self, *args: Any) -> Any:
        """A forward of prompts alone: the path's prefill."""
        return self._path.run_prefill(*args)
