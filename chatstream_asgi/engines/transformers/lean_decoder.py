"""A lean forward of Llama-family decoders for the eager path on the CPU.

On a CPU a decode step of a small model is mostly per-op cost, not arithmetic: transformers' eager Llama
runs about a hundred small ops a layer (each norm six, the rotary embedding ten, the attention plumbing,
module calls, keyword passing), which on SmolLM2-135M cost more than its int4 matmuls. :class:`LeanDecoder`
runs the same modules' weights with fewer ops: a fused RMSNorm (``F.rms_norm``), the rotary embedding as
``x * cos + roll(x) * sin`` on queries and keys together (``sin`` signed once a step, bit for bit
transformers' ``rotate_half`` form), the cache written through the layer's ``update`` and
:func:`.attention.attend` with the step's mask; the linear layers are the model's own modules (float,
int4, int8, fp16), called as they are. Only the last position's logits are computed.

It serves float32 models of the architectures whose decoder layer is exactly this computation
(:data:`ARCHITECTURES`: pre-norm, SiLU-gated MLP, rotary on all of the head, no sliding window, no norm on
queries or keys), with the architecture's own attention and MLP modules (not :mod:`.quant_joined`'s);
anything else runs transformers' forward (:func:`lean_decoder` returns None).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from chatstream_asgi.engines.transformers.attention import attend
from chatstream_asgi.engines.transformers.kv_layout import layer_windows
from chatstream_asgi.engines.transformers.lean_model import LeanLlama
from chatstream_asgi.engines.transformers.loading import in_passing_thread
from chatstream_asgi.engines.transformers.quant import release_freed_memory
from chatstream_asgi.engines.transformers.quant_cpu import Int4Linear
from chatstream_asgi.engines.transformers.quant_joined import JoinedAttention, JoinedMLP

__all__ = ["ARCHITECTURES", "LeanDecoder", "lean_decoder"]

ARCHITECTURES = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"})
"""Causal LMs whose decoder layer is the computation :class:`LeanDecoder` runs (SmolLM2 is a Llama)."""


def lean_decoder(model: nn.Module, device: torch.device) -> LeanDecoder | None:
    """A :class:`LeanDecoder` over ``model`` where it computes what transformers' forward does (or ``model`` is a
    :class:`~.lean_model.LeanLlama`, which has no other forward), else None."""
    config = model.config
    if (
        device.type != "cpu"
        or not (isinstance(model, LeanLlama) or type(model).__name__ in ARCHITECTURES)
        or getattr(config, "hidden_act", None) != "silu"
        or model.dtype != torch.float32
        or any(w is not None for w in layer_windows(config))
        or (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0) != 1.0
        or any(isinstance(m, (JoinedAttention, JoinedMLP)) for m in model.modules())
    ):
        return None
    return in_passing_thread(lambda: _built(model))


def _built(model: nn.Module) -> LeanDecoder:
    """The decoder, its joined layers' freed codes handed back to the system.

    Run in a passing thread: joining copies tensors in parallel regions, and an OpenMP team left on the
    caller's thread beside the engine's halves the step's speed (:func:`.loading.in_passing_thread`).
    """
    decoder = LeanDecoder(model)
    release_freed_memory()
    return decoder


class LeanDecoder:
    """``model``'s forward with fewer ops (see the module docstring); holds references to its modules."""

    def __init__(self, model: nn.Module) -> None:
        inner: Any = model.model
        config = model.config
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.norm = _norm(inner.norm)
        self.head = model.get_output_embeddings()
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scaling = self.head_dim**-0.5
        self.layers = [
            (
                _norm(layer.input_layernorm),
                _norm(layer.post_attention_layernorm),
                _projection(layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj),
                _forward(layer.self_attn.o_proj),
                _projection(layer.mlp.gate_proj, layer.mlp.up_proj),
                _forward(layer.mlp.down_proj),
            )
            for layer in inner.layers
        ]
        self.intermediate = config.intermediate_size

    @torch.inference_mode()
    def __call__(
        self, cache: Any, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Run ``input_ids`` ``[B, T]`` at ``positions`` through the layers, each writing its keys and values
        through ``cache.update`` and attending where ``mask`` ``[B, 1, T, L]`` allows; the last position's
        logits ``[B, vocab]``."""
        x = self.embed(input_ids)
        b, t, hidden = x.shape
        cos, sin = self.rotary(x, positions)
        half = self.head_dim // 2
        cos, sin = cos[:, :, None], torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)[:, :, None]
        heads, kv_heads, dim, width = self.heads, self.kv_heads, self.head_dim, self.intermediate
        attention_mask: torch.Tensor | None = mask
        if b == 1 and t == 1 and bool(mask.all()):
            attention_mask = None  # one row attending all its columns: SDPA without a mask (a quarter faster)
        x = x.view(b * t, hidden)  # the residual stream as rows: the linear layers take and give 2-D tensors
        for index, (norm1, norm2, qkv, o_proj, gate_up, down) in enumerate(self.layers):
            projected = qkv(F.rms_norm(x, *norm1)).view(b, t, heads + 2 * kv_heads, dim)
            qk = projected[:, :, : heads + kv_heads]
            qk = qk * cos + qk.roll(half, dims=-1) * sin
            query, key = qk[:, :, :heads].transpose(1, 2), qk[:, :, heads:].transpose(1, 2)
            keys, values = cache.update(key, projected[:, :, heads + kv_heads :].transpose(1, 2), index)
            out = attend(query, keys, values, attention_mask, self.scaling, {})
            x = x + o_proj(out.view(b * t, heads * dim))
            gated = gate_up(F.rms_norm(x, *norm2))
            x = x + down(F.silu(gated[:, :width]) * gated[:, width:])
        return self.head(F.rms_norm(x.view(b, t, hidden)[:, -1], *self.norm))


def _projection(*modules: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The outputs of ``modules`` (linear layers reading one input) side by side: one joined int4 layer where
    they are int4 layers alike (:meth:`.quant_cpu.Int4Linear.joined`), else each layer and a concatenation."""
    joined = Int4Linear.joined(modules) if all(type(m) is Int4Linear for m in modules) else None  # type: ignore[arg-type]
    if joined is not None:
        return joined.rows_forward()
    forwards = [_forward(m) for m in modules]
    return lambda h: torch.cat([f(h) for f in forwards], dim=-1)


def _forward(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``module``'s forward of rows ``[N, in]``, called without ``nn.Module.__call__``'s hook handling (a few
    microseconds a call); an int4 layer's kernel bound to its tensors (:meth:`.quant_cpu.Int4Linear.rows_forward`)."""
    if type(module) is Int4Linear:
        return module.rows_forward()
    return module.forward


def _norm(module: nn.Module) -> tuple[tuple[int, ...], torch.Tensor, float]:
    """``F.rms_norm``'s arguments for one of the model's RMSNorm modules (transformers' or ``nn.RMSNorm``)."""
    weight = module.weight
    return tuple(weight.shape), weight, module.eps if isinstance(module, nn.RMSNorm) else module.variance_epsilon
