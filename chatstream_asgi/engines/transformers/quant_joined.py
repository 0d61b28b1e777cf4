"""Joined FP8 projections: the linear layers that read one input run as one layer.

A decode step of a few rows reads each weight once, and a small layer reads it badly: the 8B shape's
1024-column key and value projections (4 MB each) read at 0.15 of the copy rate, the query projection at
0.45, where the 14336-column gate and up projections reach 0.7. Joined, query, key and value become one
``[q + 2 kv, hidden]`` layer and gate and up one ``[2 intermediate, hidden]`` layer: one kernel where
there were three and two, each wide enough to fill the GPU, and (above 16 rows, W8A8) the activations
scaled once where they were scaled three and two times. :meth:`.quant_fp8.Fp8Linear.joined` concatenates the layers'
e4m3 codes, per-feature scales and biases, so each output feature is computed from the same codes and
scale as before: exact, up to the summation order the kernel picks for the wider shape.

Where: transformers' modules call their projections one by one, so joining replaces the module that does:

- the MLP (:class:`JoinedMLP`), for :data:`MLPS`: ``down(act(gate(x)) * up(x))``, the same computation
  from one ``gate_up`` product;
- the attention (:class:`JoinedAttention`), for :data:`ATTENTIONS`: the class's own forward with the three
  projections as one product, split by heads. It keeps the model's attention module (its config, layer
  index, query/key norms, output projection) and calls the modeling file's own rotary function and the
  attention function the config names (the engine's, :mod:`.attention`), handing it that module, so the
  cache write, the static cache's slotted attention and the eager path are what they were.

The modules are plain ``nn.Module`` code over tensors, so a decoder layer that holds them traces whole
under ``torch.compile(fullgraph=True)`` and replays in CUDA graphs as before. Rewriting the forward
rather than wrapping it (say, projections handing out slices of one product computed ahead) keeps
state out of the step; the price is an allowlist: only transformers' own classes whose forward is known
to be this computation are joined (Llama, Mistral, Qwen2, Qwen3, matched by module and name, so not a
remote-code class of the same name; the tests compare each with its separate layers through transformers'
forward), any other module keeps its separate layers.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from chatstream_asgi.engines.transformers.quant_fp8 import Fp8Linear

__all__ = ["ATTENTIONS", "MLPS", "JoinedAttention", "JoinedMLP", "join_projections"]

_MODELS = "transformers.models."
MLPS = frozenset(
    _MODELS + name
    for name in ("llama.modeling_llama.LlamaMLP", "mistral.modeling_mistral.MistralMLP",
                 "qwen2.modeling_qwen2.Qwen2MLP", "qwen3.modeling_qwen3.Qwen3MLP")
)  # fmt: skip
"""MLP classes whose forward is ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``."""

ATTENTIONS = {
    _MODELS + "llama.modeling_llama.LlamaAttention": ("none", False),
    _MODELS + "mistral.modeling_mistral.MistralAttention": ("config", False),
    _MODELS + "qwen2.modeling_qwen2.Qwen2Attention": ("module", False),
    _MODELS + "qwen3.modeling_qwen3.Qwen3Attention": ("module", True),
}
"""Attention classes whose forward :class:`JoinedAttention` computes: where each takes the sliding window it
passes its attention function (none: Llama; the config's: Mistral; its own: Qwen2, Qwen3), and whether it
normalises queries and keys per head before the rotary embedding (Qwen3's ``q_norm``, ``k_norm``)."""


def join_projections(model: nn.Module) -> Counter[str]:
    """Replace ``model``'s MLPs and attention modules of the allowlisted classes whose projections are all
    :class:`.quant_fp8.Fp8Linear` layers by their joined forms; returns how many of each were joined."""
    done: Counter[str] = Counter()
    for name, module in list(model.named_modules()):
        kind = _qualified(type(module))
        if kind in MLPS and _fp8(module.gate_proj, module.up_proj):
            model.set_submodule(name, JoinedMLP(module))
            done["joined gate/up"] += 1
        elif kind in ATTENTIONS and _fp8(module.q_proj, module.k_proj, module.v_proj):
            model.set_submodule(name, JoinedAttention(module))
            done["joined q/k/v"] += 1
    return done


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _fp8(*layers: nn.Module) -> bool:
    return all(type(layer) is Fp8Linear for layer in layers) and len({layer.bias is None for layer in layers}) == 1


class JoinedMLP(nn.Module):
    """A gated MLP (:data:`MLPS`) with its gate and up projections as one layer."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.width = mlp.gate_proj.out_features
        self.gate_up_proj = Fp8Linear.joined([mlp.gate_proj, mlp.up_proj])
        self.down_proj = mlp.down_proj
        self.act_fn = mlp.act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gated = self.gate_up_proj(x)
        return self.down_proj(self.act_fn(gated[..., : self.width]) * gated[..., self.width :])


class JoinedAttention(nn.Module):
    """An attention module of :data:`ATTENTIONS` with its query, key and value projections as one layer.

    ``attention`` (the model's module, its three projections taken out) keeps what the forward reads:
    the head size, layer index, scaling, norms, output projection, and is what the attention function
    is handed, as transformers' forward hands it.
    """

    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        projections = (attention.q_proj, attention.k_proj, attention.v_proj)
        self.qkv_proj = Fp8Linear.joined(projections)
        self.heads = tuple(p.out_features // attention.head_dim for p in projections)
        for name in ("q_proj", "k_proj", "v_proj"):
            delattr(attention, name)
        self.attention = attention
        window, self.qk_norm = ATTENTIONS[_qualified(type(attention))]
        self.window = (
            {}
            if window == "none"
            else {"sliding_window": getattr(attention.config, "sliding_window", None)}
            if window == "config"
            else {"sliding_window": attention.sliding_window}
        )
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # here: the CPU's lean path never joins

        self.interfaces = ALL_ATTENTION_FUNCTIONS
        modeling = sys.modules[type(attention).__module__]  # what the class's forward calls
        self.rotary: Callable[..., tuple[torch.Tensor, torch.Tensor]] = modeling.apply_rotary_pos_emb
        self.eager: Callable[..., Any] = modeling.eager_attention_forward

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """transformers' forward of the class (Llama's, and the others' differences), one product for three."""
        attention = self.attention
        input_shape = hidden_states.shape[:-1]
        states = self.qkv_proj(hidden_states).view(*input_shape, -1, attention.head_dim)
        query, key, value = states.split(self.heads, dim=-2)
        if self.qk_norm:
            query, key = attention.q_norm(query), attention.k_norm(key)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        cos, sin = position_embeddings
        query, key = self.rotary(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, attention.layer_idx, kwargs=kwargs)
        interface = self.interfaces.get_interface(attention.config._attn_implementation, self.eager)
        out, weights = interface(
            attention,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not attention.training else attention.attention_dropout,
            scaling=attention.scaling,
            **self.window,
            **kwargs,
        )
        return attention.o_proj(out.reshape(*input_shape, -1).contiguous()), weights
