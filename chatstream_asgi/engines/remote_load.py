"""What a remote OpenAI-compatible server reports of its own load, read from the endpoints it exposes.

Probed in order by :class:`~chatstream_asgi.engines.remote.OpenAIEngine.probe_load`: chatstream-asgi's
``/get_load``, llama.cpp's ``/slots``, then the Prometheus ``/metrics`` of vLLM, llama.cpp or TGI.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from chatstream_asgi.engines.base import RemoteLoad

if TYPE_CHECKING:
    import httpx

__all__ = ["LOAD_PROBES", "LOAD_PROBE_TIMEOUT", "as_int"]


def as_int(value: Any, default: int | None = None) -> int | None:
    """``value`` where it is an integer (not a bool), else ``default``."""
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _from_get_load(response: httpx.Response) -> RemoteLoad | None:
    """chatstream-asgi's ``/get_load``."""
    data = response.json()
    busy = as_int(data.get("processing"), None) if isinstance(data, Mapping) else None
    if busy is None:
        return None
    return RemoteLoad(busy + (as_int(data.get("waiting"), 0) or 0), as_int(data.get("max_processing")), "get_load")


def _from_slots(response: httpx.Response) -> RemoteLoad | None:
    """llama.cpp server's ``/slots``: one object per slot, ``is_processing`` (``state == 1`` before 2024-11)."""
    slots = response.json()
    if not isinstance(slots, list) or not slots or not all(isinstance(slot, Mapping) for slot in slots):
        return None
    busy = sum(1 for slot in slots if slot.get("is_processing") or slot.get("state") == 1)
    return RemoteLoad(busy, len(slots), "slots")


_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{[^}]*\})?\s+([-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)(?:\s|$)")
_METRICS = {
    "vllm:num_requests_running": "vllm",
    "vllm:num_requests_waiting": "vllm",
    "llamacpp:requests_processing": "llama.cpp",
    "llamacpp:requests_deferred": "llama.cpp",
    "tgi_batch_current_size": "tgi",
    "tgi_queue_size": "tgi",
}


def _from_metrics(response: httpx.Response) -> RemoteLoad | None:
    """Running plus waiting requests from the Prometheus text of vLLM, llama.cpp or TGI (summed over labels)."""
    busy = 0.0
    source = None
    for line in response.text.splitlines():
        sample = _SAMPLE.match(line)
        if sample is not None and sample[1] in _METRICS:
            busy += float(sample[2])
            source = _METRICS[sample[1]]
    return None if source is None else RemoteLoad(round(busy), None, f"metrics ({source})")


LOAD_PROBES: tuple[tuple[str, Callable[[httpx.Response], RemoteLoad | None]], ...] = (
    ("/get_load", _from_get_load),
    ("/slots", _from_slots),
    ("/metrics", _from_metrics),
)
LOAD_PROBE_TIMEOUT = 2.0
