"""A Llama model's weights without transformers' modeling code, for the lean decoder to run on the CPU.

transformers' model classes import ``transformers.modeling_utils``, and with it ``torch.distributed.tensor``,
``torch._dynamo`` and sympy; its Llama config class imports most of that too (through its validators):
about 100 MiB resident (the idle CPU server on SmolLM2 quantized: 522 MiB with it, 423 without) spent on code
the server never runs, since :class:`~.lean_decoder.LeanDecoder` computes the forward. A
:class:`LeanLlama` holds the same modules under transformers' parameter names (``model.layers.0.self_attn.q_proj``,
``lm_head``, ...), so that GGUF loading (:func:`~.gguf_loading.load_gguf_lean`) fills it through transformers'
name map and :class:`~.lean_decoder.LeanDecoder` reads it as it reads ``LlamaForCausalLM``; it has no forward of
its own (the engine's slotted cache, which runs transformers' forward, does not take it).

:class:`LeanConfig` is what transformers' ``LlamaConfig`` would make of a GGUF's config (the dict transformers
reads from the file's metadata), for the configs that hold nothing else than it reads (:meth:`LeanConfig.of`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["LeanConfig", "LeanLlama", "RotaryEmbedding"]

_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "max_position_embeddings", "rms_norm_eps", "rope_theta")  # fmt: skip
_OPTIONAL = ("num_key_value_heads", "head_dim", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
_IGNORED = ("model_type", "_model_name_or_path", "unk_token_id")  # no part of the computation, as for transformers


@dataclass(frozen=True)
class LeanConfig:
    """A Llama config, under the names of transformers' config attributes that the engine reads."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1  # LlamaConfig's defaults
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    name_or_path: str = ""
    model_type: str = "llama"
    hidden_act: str = "silu"

    @classmethod
    def of(cls, values: dict[str, Any], name_or_path: str) -> LeanConfig | None:
        """The config of a Llama GGUF whose config dict ``values`` (``load_gguf_checkpoint``'s) holds only keys
        read here, with LlamaConfig's defaults for those it lacks; None for anything else (another model type,
        a key that would change the computation), which transformers' model class then serves."""
        known = {*_REQUIRED, *_OPTIONAL, *_IGNORED}
        if values.get("model_type") != "llama" or not values.keys() <= known or not values.keys() >= set(_REQUIRED):
            return None
        given = {k: v for k, v in values.items() if k not in _IGNORED}
        heads = given["num_attention_heads"]
        given.setdefault("num_key_value_heads", heads)
        given.setdefault("head_dim", given["hidden_size"] // heads)
        if not all(isinstance(given[k], int) for k in ("num_key_value_heads", "head_dim", "num_hidden_layers")):
            return None  # per-layer head counts: not a Llama
        return cls(**given, name_or_path=name_or_path)

    @property
    def rope_parameters(self) -> dict[str, Any]:
        return {"rope_type": "default", "rope_theta": self.rope_theta}

    def get_text_config(self) -> LeanConfig:
        """This config (transformers' composite configs answer their text model's)."""
        return self


class RotaryEmbedding(nn.Module):
    """Llama's default rotary embedding: ``cos`` and ``sin`` ``[B, T, head_dim]`` of positions ``[B, T]``, computed
    as transformers' ``LlamaRotaryEmbedding`` computes them (the same ops: equal bit for bit)."""

    def __init__(self, config: LeanConfig) -> None:
        super().__init__()
        dim = config.head_dim
        steps = torch.arange(0, dim, 2, dtype=torch.float, device="cpu")  # on the CPU inside a meta-device build
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", 1.0 / (config.rope_theta ** (steps / dim)), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype=x.dtype), emb.sin().to(dtype=x.dtype)


class LeanLlama(nn.Module):
    """``LlamaForCausalLM``'s modules by transformers' names, float ``nn.Linear`` and ``nn.Embedding`` until the
    loader swaps in quantized ones; norms are ``nn.RMSNorm``. Build it on the meta device and fill it."""

    def __init__(self, config: LeanConfig) -> None:
        super().__init__()
        self.config = config
        hidden, width = config.hidden_size, config.intermediate_size
        q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim

        def linears(*shapes: tuple[str, int, int]) -> nn.ModuleDict:
            return nn.ModuleDict({name: nn.Linear(cols, rows, bias=False) for name, cols, rows in shapes})

        def norm() -> nn.RMSNorm:
            return nn.RMSNorm(hidden, eps=config.rms_norm_eps)

        layers = [
            nn.ModuleDict({
                "self_attn": linears(("q_proj", hidden, q), ("k_proj", hidden, kv), ("v_proj", hidden, kv),
                                     ("o_proj", q, hidden)),
                "mlp": linears(("gate_proj", hidden, width), ("up_proj", hidden, width), ("down_proj", width, hidden)),
                "input_layernorm": norm(),
                "post_attention_layernorm": norm(),
            })
            for _ in range(config.num_hidden_layers)
        ]  # fmt: skip
        self.model = nn.ModuleDict({
            # given its (empty) weight: a random init on the meta device would import torch._dynamo (~90 MiB)
            "embed_tokens": nn.Embedding(config.vocab_size, hidden, _weight=torch.empty(config.vocab_size, hidden)),
            "layers": nn.ModuleList(layers),
            "norm": norm(),
            "rotary_emb": RotaryEmbedding(config),
        })  # fmt: skip
        self.lm_head = nn.Linear(hidden, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype
