"""Model fixtures for engine tests.

``tiny_model_dir`` builds a tiny randomly initialised Llama-style model and a byte-level BPE
tokenizer with a ChatML chat template, saves both to a temporary directory, and every engine
fixture loads them back through the real loading code (:func:`chatstream_asgi.engines.transformers.loading.load_model`).
:data:`ARCHITECTURES` and :func:`build_architecture` do the same for every architecture of the coverage matrix.
``smollm2_engine`` loads the real SmolLM2-135M-Instruct (tests marked ``smollm2``).
:func:`engine_reached` awaits an event that the engine's own thread sets; :func:`greedy_answers` asks an engine
questions.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


async def engine_reached(event: threading.Event, timeout: float = 60.0) -> None:
    """Await ``event``, which the engine's thread sets (a step it is about to run, a request it was
    handed), without blocking the event loop; fail after ``timeout`` seconds."""
    assert await asyncio.to_thread(event.wait, timeout), f"the engine did not get there in {timeout} s"


async def greedy_answers(engine: Any, questions: Sequence[str], max_new_tokens: int = 24) -> list[list[Any]]:
    """Start ``engine``, ask ``questions`` in one batch (greedy with the default model's repetition penalty, two
    alternatives' log-probabilities) and shut it down: each reply's text and its tokens' log-probabilities.

    The requests are queued under the engine's lock, so that they are prefilled together whatever the timing:
    a batch of other shapes rounds the log-probabilities differently."""
    from chatstream_asgi.engines.base import GenerationParams, GenerationRequest

    params = GenerationParams(temperature=0.0, repetition_penalty=1.1, penalize_prompt_tokens=False,
                              max_new_tokens=max_new_tokens, logprobs=2)  # fmt: skip
    await engine.start()
    try:
        with engine._cond:
            streams = [engine.generate(GenerationRequest(f"q{i}", [{"role": "user", "content": q}], params))
                       for i, q in enumerate(questions)]  # fmt: skip
        answers = []
        for stream in streams:
            text, logprobs = "", []
            async for delta in stream:
                text += delta
                logprobs += [p.logprob for p in stream.take_logprobs()]
            answers.append([text, logprobs])
        return answers
    finally:
        await engine.shutdown()


CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Hello world, this is a tiny tokenizer for fast engine tests.",
    "user assistant system message content tokens stream batch",
] * 20


def build_tiny_tokenizer(directory: Path) -> Any:
    """Write a byte-level BPE tokenizer (ChatML chat template) to ``directory`` and return it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # its progress lines went to stdout, between a benchmark's table lines
    )
    bpe.train_from_iterator(_CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(directory)
    return tokenizer


def build_tiny_model(directory: Path) -> Path:
    """Write a tiny random Llama model and tokenizer to ``directory`` and return it."""
    return build_architecture(directory, "llama", max_position_embeddings=512)


WINDOW = 8
"""The sliding window of the coverage matrix's windowed models: shorter than its prompts and replies."""

_SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}
_ALTERNATING = {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": WINDOW}
_EXPERTS = {"num_experts_per_tok": 2}
ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    # matrix id: (transformers config class, its settings beyond the shared ones)
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen2-window": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "qwen3_moe": ("Qwen3MoeConfig", {"num_experts": 4, "moe_intermediate_size": 32, "head_dim": 16, **_EXPERTS}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "sliding_window": None, **_EXPERTS}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "mistral-window": ("MistralConfig", {"sliding_window": WINDOW}),
    "phi3": ("Phi3Config", {"sliding_window": None}),
    "gemma": ("GemmaConfig", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "query_pre_attn_scalar": 16, **_ALTERNATING}),
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": 16, "query_pre_attn_scalar": 16, **_ALTERNATING}),
    "granite": ("GraniteConfig", {"attention_multiplier": 0.25, "embedding_multiplier": 2.0, "logits_scaling": 2.0}),
    "olmo2": ("Olmo2Config", {}),
    "gpt_oss": (
        "GptOssConfig",
        {"num_local_experts": 4, "head_dim": 16, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}
        | _EXPERTS
        | _ALTERNATING,
    ),
}
"""The coverage matrix: a tiny random model per architecture (2 layers, float32 weights)."""


def build_architecture(directory: Path, name: str, **overrides: Any) -> Path:
    """Write a tiny random model of matrix architecture ``name`` and the tokenizer to ``directory``."""
    import torch
    import transformers

    tokenizer = build_tiny_tokenizer(directory)
    class_name, settings = ARCHITECTURES[name]
    config = getattr(transformers, class_name)(
        vocab_size=len(tokenizer),
        num_hidden_layers=2,
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **{**_SMALL, "max_position_embeddings": 1024, **settings, **overrides},
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory holding the tiny model and its tokenizer."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir: Path) -> Iterator[object]:
    """A started :class:`TransformersEngine` on the tiny model (shared by the session)."""
    from chatstream_asgi.engines.transformers import TransformersEngine

    device = os.environ.get("CHATSTREAM_TEST_DEVICE", "cpu")  # e.g. "cuda" to check the GPU path
    # Not compiled: its tests compare bfloat16 outputs with eager ones and across batch sizes, which the
    # fused kernels' rounding would flip at near ties; test_engine_static checks the compiled step.
    engine = TransformersEngine.from_pretrained(str(tiny_model_dir), device=device, max_batch_size=8, compile_mode=None)
    asyncio.run(engine.start())
    yield engine
    asyncio.run(engine.shutdown())


@pytest.fixture(scope="module")
def f32_engine(tiny_model_dir: Path) -> object:
    """An unstarted engine on a float32 copy of the tiny model, on ``CHATSTREAM_TEST_DEVICE``.

    Tests that compare greedy outputs of two computations (graph vs eager, reuse vs none, engine vs
    ``model.generate``) use it: in bfloat16 a different summation order flips near-tie greedy picks.
    """
    from chatstream_asgi.engines.transformers import TransformersEngine
    from chatstream_asgi.engines.transformers.loading import load_model

    device = os.environ.get("CHATSTREAM_TEST_DEVICE", "cpu")
    model, tokenizer, _ = load_model(str(tiny_model_dir), device=device, dtype="float32")
    return TransformersEngine(model, tokenizer, model.device)


@pytest.fixture(scope="session")
def smollm2_engine() -> Iterator[object]:
    """A started :class:`TransformersEngine` on the real SmolLM2-135M-Instruct."""
    from chatstream_asgi.engines.transformers import TransformersEngine

    engine = TransformersEngine.from_pretrained("smollm2", device="cpu")
    asyncio.run(engine.start())
    yield engine
    asyncio.run(engine.shutdown())
