"""Host-to-device copies that never wait for the device.

A copy from pageable host memory to a CUDA device first waits for everything queued on the stream
(the driver stages it through a pinned buffer). The engine queues its next step before it reads the
current one, so such a copy in the step loop stalls the host for up to two steps: every per-step
upload goes through :func:`upload`, which copies from pinned memory without waiting.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["upload"]


def upload(
    values: torch.Tensor | Sequence[int] | Sequence[float], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """``values`` (a host tensor or a list) as a ``dtype`` tensor on ``device``, queued without a host wait."""
    host = values.to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
