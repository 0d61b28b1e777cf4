"""The start-up heap, kept out of the garbage collector's full passes while a service runs.

A process that has loaded a model holds hundreds of thousands of long-lived objects, mostly its
frameworks' (SmolLM2 on CPU: about 388,000, of which the imports make 359,000), and a full collection
walks every one of them holding the GIL, so no stream moves: up to 288 ms on a 2-core machine (README,
"Garbage-collector pauses"). Frozen (:func:`gc.freeze`) once the engine has started, they are skipped:
full passes walk only what came later. The last running service unfreezes the heap when it stops
(all of it, whoever froze it), so that a model dropped afterwards is still collected.
"""

from __future__ import annotations

import gc
import logging
import threading
import time

__all__ = ["freeze", "thaw"]

logger = logging.getLogger("chatstream_asgi")

_lock = threading.Lock()
_holders = 0


def freeze() -> None:
    """Collect, then freeze every object alive now; one :func:`thaw` is owed for each call."""
    global _holders
    with _lock:
        started = time.perf_counter()
        gc.collect()
        gc.freeze()
        _holders += 1
    logger.debug("froze %d start-up objects in %.0f ms", gc.get_freeze_count(), (time.perf_counter() - started) * 1e3)


def thaw() -> None:
    """Give back one :func:`freeze`; the last one unfreezes the heap."""
    global _holders
    with _lock:
        _holders -= 1
        if _holders == 0:
            gc.unfreeze()
