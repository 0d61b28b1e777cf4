"""Model fixtures for engine tests.

``tiny_model_dir`` builds a tiny randomly initialised Llama-style model and a byte-level BPE
tokenizer with a ChatML chat template, saves both to a temporary directory, and every engine
fixture loads them back through the real loading code (:func:`chatstream_asgi.engines.transformers.loading.load_model`).
``smollm2_engine`` loads the real SmolLM2-135M-Instruct (tests marked ``smollm2``).
:func:`engine_reached` awaits an event that the engine's own thread sets.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


async def engine_reached(event: threading.Event, timeout: float = 60.0) -> None:
    """Await ``event``, which the engine's thread sets (a step it is about to run, a request it was
    handed), without blocking the event loop; fail after ``timeout`` seconds."""
    assert await asyncio.to_thread(event.wait, timeout), f"the engine did not get there in {timeout} s"


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


def build_tiny_model(directory: Path) -> Path:
    """Write a tiny random Llama model and tokenizer to ``directory`` and return it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
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

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
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
