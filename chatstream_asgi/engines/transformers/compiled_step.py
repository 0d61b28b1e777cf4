"""The decode step fused by ``torch.compile``, kept for the rows buckets where its graph replays faster.

A replayed decode step of a small model is still a few hundred small kernels (norms, rotary
embeddings, activations, residual adds around each matmul): SmolLM2-135M's step takes 3 ms on an
H100 where its weights take 0.09 ms to read. Inductor fuses them, and the fused step is captured in
the same CUDA graphs. It pays at small batches and can lose at large ones, where the matmuls
dominate, so :func:`compile_decode` measures both replays per rows bucket and keeps the faster.

The step is compiled for rows buckets up to 16, dynamic in rows and length (one graph for a single
row, one for the rest), so those buckets share it. Inductor keeps what it compiled on disk
(``TORCHINDUCTOR_CACHE_DIR``, by default under the system's temporary directory), so a restart
compiles from its cache: 66 s instead of 195 s for SmolLM2 on an H100.

Only the CUDA-graph step is compiled; the engine ignores ``compile_mode`` elsewhere, with a warning.
On CPU (2 cores, SmolLM2 in float32 over the static cache) the step is bound by its matmuls of one
to a few rows (49 of its 62 ms in ``aten::mm``), not by Python. Compiled with ``freezing`` (weights
prepacked for oneDNN/MKL) and the cache written by index assignment (inductor copies a scattered
slice ``[:b]`` of each layer's buffer out and back), it took 64 ms against 68 at batch 1 and lost
from 4 rows up at 1,024 columns (467 against 158 ms at 16); served, 1.04-1.06x tokens/s at batch 1
and 0.9x at 4, for 3-4 minutes of compiling at every start (prepacked weights are not cached).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial

import torch

from chatstream_asgi.engines.transformers.graph_runner import DecodeRunner, bucket_for, capture_graph, frozen_gc

__all__ = ["DEFAULT_COMPILE_MODE", "compile_decode", "compile_mode_for"]

logger = logging.getLogger("chatstream_asgi.engine")

DEFAULT_COMPILE_MODE = "default"
"""Inductor's mode. ``"max-autotune-no-cudagraphs"`` also autotunes the matmuls: over 5 minutes for
SmolLM2 on an H100 with the step dynamic in rows, against about 3 without."""

_SELECTION_LENGTH = 1024  # the columns both steps attend while they are timed
_MAX_COMPILED_ROWS = 16  # larger batches are matmul-bound: fusing the rest gains little there and compiling costs
_REPEATS = 20


def compile_mode_for(mode: str | bool | None, device: torch.device, graphs: bool) -> str | None:
    """The inductor mode the engine compiles its step with: ``mode`` (True: the default one) where the
    step is captured in CUDA graphs (``graphs``: static cache and ``cuda_graphs``), else None, warned."""
    mode = DEFAULT_COMPILE_MODE if mode is True else mode or None
    if mode and not (device.type == "cuda" and graphs):
        logger.warning(
            "compile_mode %r ignored on %s: it fuses only the decode step captured in CUDA graphs "
            "(static cache on CUDA, cuda_graphs on); on CPU the step is bound by its matmuls, and "
            "compiling it measured no worthwhile gain (see compiled_step)",
            mode,
            device,
        )
        return None
    return mode


def compile_decode(runner: DecodeRunner, device: torch.device, mode: str = DEFAULT_COMPILE_MODE) -> None:
    """Compile ``runner``'s step and use it for the rows buckets whose replay measures faster.

    A failure to compile (an unsupported model or platform) is logged, and the plain step stays.
    """
    started = time.perf_counter()
    length = bucket_for(min(_SELECTION_LENGTH, runner.cache.max_len), runner.length_buckets)
    buckets = [rows for rows in runner.row_buckets if rows <= _MAX_COMPILED_ROWS]
    try:
        compiled = torch.compile(runner.plain_step, mode=mode, dynamic=True, fullgraph=True)
        warm = torch.cuda.Stream(device)
        warm.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(warm):
            for rows in buckets:
                compiled(runner.inputs(rows), length)
        torch.cuda.synchronize(device)
    except Exception as exc:  # inductor's errors have no common base
        logger.warning("torch.compile failed, the decode step stays unfused: %s", exc)
        return
    compile_s = time.perf_counter() - started
    timings = []
    with frozen_gc():
        streams = torch.cuda.Stream(device), torch.cuda.Stream(device)
        for rows in buckets:
            inputs = runner.inputs(rows)
            plain = _replay_ms(partial(runner.plain_step, inputs, length), device, streams)
            fused = _replay_ms(partial(compiled, inputs, length), device, streams)
            timings.append(f"{rows}: {plain:.2f}/{fused:.2f}")
            if fused < plain:
                runner.compiled_rows.add(rows)
    runner.compiled = compiled
    logger.info(
        "compiled the decode step (%s) in %.1f s; replay ms plain/compiled by rows at %d columns: %s; "
        "compiled step used for rows %s",
        mode,
        compile_s,
        length,
        ", ".join(timings),
        sorted(runner.compiled_rows) or "none",
    )


def _replay_ms(
    forward: Callable[[], torch.Tensor], device: torch.device, streams: tuple[torch.cuda.Stream, torch.cuda.Stream]
) -> float:
    """Milliseconds a replay of ``forward``'s graph takes (``_REPEATS`` back to back, on the device's clock)."""
    graph, _ = capture_graph(forward, device, streams)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(_REPEATS):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / _REPEATS
