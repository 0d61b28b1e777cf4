"""What the model's attention modules talk to: one layer's view of key/value buffers a cache owns."""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin

__all__ = ["OwnedLayer"]


class OwnedLayer(CacheLayerMixin):
    """Layer ``index`` of ``owner``'s buffers, allocated by the owner (full attention, no sliding window)."""

    is_sliding = False
    supports_early_init = False

    def __init__(self, owner: Any, index: int) -> None:
        super().__init__()
        self.owner = owner
        self.index = index
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Buffers are allocated by the owner; nothing to do."""
