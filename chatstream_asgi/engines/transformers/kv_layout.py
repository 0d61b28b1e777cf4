"""Which keys and values each layer of a model keeps, read from its config as transformers reads it.

A layer attends over every earlier token (full attention) or over the last ``window`` tokens (a sliding
window: ``kv_pos > q_pos - window``, transformers' ``sliding_window_overlay``). transformers decides per
layer from ``config.layer_types`` (``"full_attention"`` / ``"sliding_attention"``, with
``config.sliding_window``: Gemma 2/3, gpt-oss, Qwen2/3), or, for configs without ``layer_types``, from
``config.sliding_window`` for every layer (Mistral, Mixtral, Phi-3; Qwen's configs set it to None unless
``use_sliding_window``). :func:`layer_windows` reads both, the same way.

On the slotted cache a sliding layer whose window is shorter than the context keeps a ring of
``window + ring_chunk - 1`` columns per slot instead of the whole context (:meth:`KVLayout.columns`):
position ``p`` lives in column ``p % ring``. A forward writes at most ``ring_chunk`` tokens of one
sequence (:data:`RING_CHUNK`, 512), so no token it writes overwrites a key one of its queries still
reads. What that does to prefix reuse is in :mod:`~chatstream_asgi.engines.transformers.slot_prefix`.

This module imports no torch: the budget arithmetic and the layer kinds are tested without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from chatstream_asgi.engines.base import EngineError

__all__ = ["RING_CHUNK", "KVLayout", "UnsupportedModel", "layer_windows"]

RING_CHUNK = 512
"""The most tokens of one sequence a forward writes on a model with ring layers (its prefill chunk cap)."""

_KNOWN_TYPES = {"full_attention", "sliding_attention"}


class UnsupportedModel(EngineError):
    """The engine's cache cannot serve this model (raised at load, never mid-request)."""


def layer_windows(config: Any) -> tuple[int | None, ...]:
    """Per layer of ``config``'s text model: its sliding window, or None for full attention.

    Raises :class:`UnsupportedModel` for layers that are neither (chunked, linear attention, state space).
    """
    text = config.get_text_config()
    name = getattr(text, "model_type", type(text).__name__)
    window = getattr(text, "sliding_window", None) or None
    if getattr(text, "use_sliding_window", True) is False:
        window = None
    types = getattr(text, "layer_types", None)
    if not types:
        return (window,) * text.num_hidden_layers
    unknown = set(types) - _KNOWN_TYPES
    if unknown:
        raise UnsupportedModel(
            f"{name}: layer types {sorted(unknown)} need a cache this engine does not have "
            "(only full-attention and sliding-window layers are supported)"
        )
    return tuple(window if kind == "sliding_attention" else None for kind in types[: text.num_hidden_layers])


@dataclass(frozen=True)
class KVLayout:
    """Shape of one token's keys and values across the model's layers; ``windows`` per layer (None: full)."""

    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: Any  # a torch dtype (only its ``itemsize`` is read here)
    windows: tuple[int | None, ...] = ()
    ring_chunk: int = RING_CHUNK  # the most tokens of one sequence a forward writes where rings exist

    def __post_init__(self) -> None:
        if not self.windows:
            object.__setattr__(self, "windows", (None,) * self.num_layers)

    @property
    def bytes_per_column(self) -> int:
        """Bytes of one layer's keys and values for one token."""
        return 2 * self.kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def bytes_per_token(self) -> int:
        """Bytes of one token's keys and values in every layer (what a full-attention cache holds per token)."""
        return self.num_layers * self.bytes_per_column

    def ring(self, window: int | None, context_len: int) -> int | None:
        """The columns of a ring for a layer of ``window`` in a context of ``context_len``; None where the
        layer keeps every position (full attention, or a window as long as the context)."""
        if window is None or window + self.ring_chunk - 1 >= context_len:
            return None
        return window + self.ring_chunk - 1

    def columns(self, context_len: int) -> list[int]:
        """Per layer, the columns one slot holds (a scratch column included) for ``context_len`` tokens."""
        return [(self.ring(w, context_len) or context_len) + 1 for w in self.windows]

    def slot_bytes(self, context_len: int) -> int:
        """Bytes of one slot of ``context_len`` tokens: what each layer really holds, summed."""
        return sum(self.columns(context_len)) * self.bytes_per_column

    def has_rings(self, context_len: int) -> bool:
        """Whether some layer keeps a ring (then a forward writes at most ``ring_chunk`` tokens a sequence)."""
        return any(self.ring(w, context_len) is not None for w in set(self.windows))

    @classmethod
    def of(cls, config: Any, dtype: Any) -> KVLayout:
        """The layout of ``config``'s text model; raises :class:`UnsupportedModel` for layouts it cannot hold.

        Every layer is full attention or a sliding window (:func:`layer_windows`), with one key/value
        head size (``v_head_dim`` equal to the key head size, unlike MLA models).
        """
        text = config.get_text_config()
        name = getattr(text, "model_type", type(text).__name__)
        windows = layer_windows(config)
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        v_head_dim = getattr(text, "v_head_dim", None) or head_dim
        if v_head_dim != head_dim:
            raise UnsupportedModel(
                f"{name}: value head size {v_head_dim} differs from key head size {head_dim}; not supported"
            )
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        return cls(text.num_hidden_layers, kv_heads, head_dim, dtype, windows, RING_CHUNK)
