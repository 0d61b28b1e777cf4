"""The model's forwards on the eager path, and the attention kernels every forward runs under."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import DynamicCache

from chatstream_asgi.engines.transformers.attention import (
    STEP_KEYWORD,
    DenseStep,
    dense_masks,
    install,
    mask_placeholder,
)
from chatstream_asgi.engines.transformers.kv_layout import layer_windows
from chatstream_asgi.engines.transformers.lean_decoder import lean_decoder
from chatstream_asgi.engines.transformers.sequence import EngineSequence

__all__ = ["ModelRunner", "past_layers"]


class ModelRunner:
    """Calls ``model`` with a cache: :meth:`run` for variable shapes under the engine's attention
    kernels, :meth:`call` for the captured static steps, :meth:`prefill` and :meth:`step` eagerly.

    Installs the engine's attention function on the model (:func:`.attention.install`); the eager
    forwards hand it a :class:`.attention.DenseStep` built from each column's position, or run the
    model's :class:`.lean_decoder.LeanDecoder` where it has one (Llama-family models on the CPU).
    """

    def __init__(self, model: Any, device: torch.device) -> None:
        self.model = model
        install(model)
        self._cache_arg = "cache" if "cache" in _forward_params(model) else "past_key_values"
        self._attention = _attention_kernels(device)
        self.placeholder = mask_placeholder(model.config, device)
        self.windows = set(layer_windows(model.config))
        self.decoder = lean_decoder(model, device)

    def prefill(
        self,
        input_ids: torch.Tensor,
        key_positions: torch.Tensor,
        positions: torch.Tensor,
        past: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Prefill left-padded prompts after ``past`` keys/values (``key_positions``: every column's position,
        -1 where empty; ``positions``: the new tokens'); return last-position logits and the layers."""
        cache = DynamicCache()  # no sliding layers: every column is kept, the masks apply the windows
        for layer, (keys, values) in enumerate(past):
            cache.update(keys, values, layer)
        logits = self._forward(cache, input_ids, key_positions, positions)
        return logits, [(layer.keys, layer.values) for layer in cache.layers]

    def step(
        self, cache: Any, input_ids: torch.Tensor, key_positions: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """One eager decode forward over ``cache``; next-token logits ``[rows, vocab]``."""
        return self._forward(cache, input_ids, key_positions, positions)

    def _forward(
        self, cache: Any, input_ids: torch.Tensor, key_positions: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """The last position's logits ``[rows, vocab]``: through the lean decoder, else transformers' forward."""
        masks = dense_masks(positions, key_positions, self.windows)
        if self.decoder is not None:
            return self.decoder(cache, input_ids, positions, masks[None])
        inputs = {"input_ids": input_ids, "attention_mask": self.placeholder, "position_ids": positions}
        out = self.run(cache, **inputs, logits_to_keep=1, **{STEP_KEYWORD: DenseStep(masks)})
        return out.logits[:, -1, :]

    def run(self, cache: Any, **inputs: Any) -> Any:
        """The model's forward with ``cache``, under the engine's attention kernels (variable shapes)."""
        with self._attention():
            return self.call(cache, **inputs)

    def call(self, cache: Any, **inputs: Any) -> Any:
        """The model's forward with ``cache`` under PyTorch's own attention choice.

        For the static steps: their shapes come in a few buckets, so cuDNN attention plans
        once per bucket (and within a CUDA graph, at capture only); it measured fastest there.
        """
        return self.model(use_cache=True, **inputs, **{self._cache_arg: cache})


def past_layers(seqs: list[EngineSequence], past: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
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
