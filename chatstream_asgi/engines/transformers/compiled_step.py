"""The decode step with the model's blocks fused by ``torch.compile``, where its replay measures faster.

A replayed decode step of a small model is still a few hundred small kernels (norms, rotary
embeddings, activations, residual adds around each matmul): SmolLM2-135M's step takes 3 ms on an
H100 where its weights take 0.09 ms to read. Inductor fuses them, and the fused step is captured in
the same CUDA graphs. It pays at small batches and can lose at large ones, where the matmuls
dominate, so :func:`compile_steps` measures both replays per rows bucket and keeps the faster.

What is compiled is the model's repeated block (its decoder layer, one class run once per layer)
and the modules beside the stack (rotary embedding, final norm), not the whole forward: dynamo
traces one layer instead of thirty and inductor compiles it once. SmolLM2's decode step whole took
195 s; by blocks, 13 s in inductor's ``"default"`` mode, 38-53 s in :data:`DEFAULT_COMPILE_MODE`,
and 13 s from inductor's disk cache (``TORCHINDUCTOR_CACHE_DIR``, by default under the system's
temporary directory); the prefill chunks' every shape, 30-35 s (14 s from the cache), on an H100.
Each block is handed its own layer of the cache (:class:`_BlockCache`), so the compiled code does
not depend on the layer index and one graph serves every layer (one for a single row, one for any
other number of rows, any length).

A compiled layer attends through the engine's own attention function
(:mod:`~chatstream_asgi.engines.transformers.attention`), traced with it: one query token's heads grouped
onto their key/value head, as eagerly (transformers groups them only eagerly; compiled, it copied every
key/value head once per query head first, which made SmolLM2's compiled step at 64 rows 8.8 ms against
the plain step's 4.4, and 2.3 grouped).

Only the CUDA-graph step is compiled; elsewhere the engine's default compiles nothing, and an explicit
``compile_mode`` is ignored with a warning.
On CPU (2 cores, SmolLM2 in float32 over the static cache) the step is bound by its matmuls of one
to a few rows (49 of its 62 ms in ``aten::mm``), not by Python. Compiled with ``freezing`` (weights
prepacked for oneDNN/MKL) and the cache written by index assignment (inductor copies a scattered
slice ``[:b]`` of each layer's buffer out and back), it took 64 ms against 68 at batch 1 and lost
from 4 rows up at 1,024 columns (467 against 158 ms at 16); served, 1.04-1.06x tokens/s at batch 1
and 0.9x at 4, for 3-4 minutes of compiling at every start (prepacked weights are not cached).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
import types
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from chatstream_asgi.engines.transformers.graphs import bucket_for, capture_graph, frozen_gc

if TYPE_CHECKING:
    from chatstream_asgi.engines.transformers.step_runner import Key, StepRunner

__all__ = [
    "AUTO",
    "COMPILE_MODES",
    "DEFAULT_COMPILE_MODE",
    "FusedModules",
    "compile_mode_for",
    "compile_steps",
    "repeated_blocks",
]

logger = logging.getLogger("chatstream_asgi.engine")

AUTO = "auto"
"""The engine's default: compile with :data:`DEFAULT_COMPILE_MODE` where the step is captured, else nothing."""

DEFAULT_COMPILE_MODE = "max-autotune-no-cudagraphs"
"""Inductor's mode: the matmuls autotuned too. On an H100 the 1.1B shape's one-row step replayed in
1.70 ms, against 2.06 ms in ``"default"``, for 38-53 s of compiling against 12-13 s."""

COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
"""The inductor modes the engine accepts (the others capture CUDA graphs of their own)."""

_SELECTION_LENGTH = 1024  # the columns both steps attend while they are timed
_REPEATS = 20
_CACHE_ARGS = ("cache", "past_key_values")  # what transformers calls a layer's cache argument (new, old)

_copies = itertools.count()
_FUSING: ContextVar[FusedModules | None] = ContextVar("chatstream_fusing", default=None)


def compile_mode_for(mode: str | bool | None, device: torch.device, graphs: bool) -> str | None:
    """The inductor mode the engine compiles its step with, where the step is captured in CUDA graphs
    (``graphs``: static cache and ``cuda_graphs``); else None.

    ``mode``: :data:`AUTO` (the default one where captured, silently nothing elsewhere), True (the
    default one) or one of :data:`COMPILE_MODES` (both warned where not captured), None or False
    (off). Raises ValueError for another mode: the others capture CUDA graphs of their own, inside
    the engine's.
    """
    if mode == AUTO:
        return DEFAULT_COMPILE_MODE if device.type == "cuda" and graphs else None
    mode = DEFAULT_COMPILE_MODE if mode is True else mode or None
    if mode is not None and mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r}: expected one of {', '.join(map(repr, (AUTO, *COMPILE_MODES)))}")
    if mode and not (device.type == "cuda" and graphs):
        reason = (
            "the decode step is compiled only where it is captured in CUDA graphs (static cache, cuda_graphs on)"
            if device.type == "cuda"
            else "only the CUDA-graph decode step is compiled; on CPU the step is bound by its matmuls and "
            'compiling measured no worthwhile gain (README: "Fusing the step")'
        )
        logger.warning("compile mode %r ignored on %s: %s", mode, device, reason)
        return None
    return mode


def repeated_blocks(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The model's longest list of modules of one class (its decoder layers), if any."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len({type(b) for b in m}) == 1]
    return max(lists, key=len, default=None)


class _BlockCache:
    """What a compiled block sees as its cache: its own layer, whatever layer index it passes.

    The index is a module attribute; were it read, dynamo would compile the block once per layer.
    """

    def __init__(self, layer: Any) -> None:
        self._layer = layer

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._layer.update(key_states, value_states)


def _module_forward(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """What is compiled: the class's forward, not the instance's (routed to this one: it would recurse)."""
    return type(module).forward(module, *args, **kwargs)


def _own_copy(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with a code object of its own: dynamo keeps what it compiled, and counts recompiles
    against ``recompile_limit`` (8), per code object, so each compiled set of modules gets its own."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{next(_copies)}")
    return types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class FusedModules:
    """``model``'s blocks and the modules beside them, compiled; used while :meth:`active`.

    Each module's ``forward`` is routed once: outside :meth:`active` (prefill, the plain step, other
    engines over the same model, other threads) it runs the model's own forward, unchanged.
    """

    def __init__(self, model: torch.nn.Module, layers: Sequence[Any], mode: str) -> None:
        blocks = repeated_blocks(model)
        if blocks is None or len(blocks) != len(layers):
            raise ValueError(f"no list of {len(layers)} blocks of one class (one per cache layer) in the model")
        parent = next(m for m in model.modules() if any(child is blocks for child in m.children()))
        beside = [c for c in parent.children() if c is not blocks and not isinstance(c, torch.nn.Embedding)]
        for i, block in enumerate(blocks):  # cache layers are paired with blocks by position
            index = next((m.layer_idx for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)), i)
            if index != i:
                raise ValueError(f"block {i} of the model attends with cache layer {index}")
        self._caches = {id(block): _BlockCache(layer) for block, layer in zip(blocks, layers, strict=True)}
        # Blocks of sliding and of full attention (Gemma 2, gpt-oss) get one compiled function each: in one,
        # every chunk shape compiled twice, once per window, and passed dynamo's limit of 8 variants.
        self._kinds = {
            id(b): (type(b), getattr(layer, "window", None)) for b, layer in zip(blocks, layers, strict=True)
        }
        self._compiled = {  # per kind: each its own compiled variants (rows, and for chunks, reused columns)
            kind: torch.compile(_own_copy(_module_forward), mode=mode, dynamic=True, fullgraph=True)
            for kind in {self._kind(m) for m in (*blocks, *beside)}
        }
        for module in (*blocks, *beside):
            _route(module)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Route the model's blocks to their compiled forward (in this thread, for the block's duration)."""
        token = _FUSING.set(self)
        try:
            yield
        finally:
            _FUSING.reset(token)

    def forward(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``module``'s compiled forward; a block gets its own cache layer."""
        cache = self._caches.get(id(module))
        if cache is not None:
            name = next((n for n in _CACHE_ARGS if n in kwargs), None)
            if name is None:
                raise TypeError(
                    f"{type(module).__name__} is not given its cache by keyword ({' or '.join(_CACHE_ARGS)})"
                )
            kwargs = {**kwargs, name: cache}
        return self._compiled[self._kind(module)](module, *args, **kwargs)

    def _kind(self, module: torch.nn.Module) -> tuple[type, int | None]:
        """A block's class and its attention window; another module's class."""
        return self._kinds.get(id(module), (type(module), None))


def _route(module: torch.nn.Module) -> None:
    """Make ``module``'s forward the compiled one while a :class:`FusedModules` is active (once per module).

    A partial of a module-level function, not a closure: a deep copy of the model then gets a forward
    bound to the copy (a closure would run the original's weights), and the model still pickles.
    """
    forward = module.forward
    if isinstance(forward, partial) and forward.func is _routed_forward:
        return
    module.forward = partial(_routed_forward, module, forward)


def _routed_forward(module: torch.nn.Module, eager: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``module``'s compiled forward while a :class:`FusedModules` is active in this thread, else ``eager``
    (its forward as it was), also while dynamo traces the whole model (a user's ``torch.compile``,
    transformers' ``generate`` with a static cache): dynamo cannot trace ``ContextVar.get``."""
    fused = None if torch.compiler.is_compiling() else _FUSING.get()
    return eager(*args, **kwargs) if fused is None else fused.forward(module, args, kwargs)


def compile_steps(
    runner: StepRunner, model: torch.nn.Module, device: torch.device, mode: str = DEFAULT_COMPILE_MODE
) -> None:
    """Compile ``model``'s blocks for the decode steps (in ``mode``) and for the steps with a prompt chunk
    (inductor's ``"default"``: chunks come in many shapes, which matmuls autotuned for one would not suit),
    and use each where its replay measures faster: per rows bucket for the decode steps, at the chunk a
    long prompt joins running rows with for the others.

    Everything the capture will run is compiled here, so a failure to compile (an unsupported
    model or platform) leaves that part plain, logged, and never fails the start.
    """
    streams = torch.cuda.Stream(device), torch.cuda.Stream(device)
    decode = _compile_decode(runner, model, device, mode, streams)
    chunks = _compile_chunks(runner, model, device, streams)

    def fused(key: Key) -> contextlib.AbstractContextManager[Any]:
        rows, _, tokens, _ = key
        if tokens:
            return chunks() if chunks is not None else contextlib.nullcontext()
        return decode[0]() if decode is not None and rows in decode[1] else contextlib.nullcontext()

    runner.fused = fused


def _compile_decode(
    runner: StepRunner,
    model: torch.nn.Module,
    device: torch.device,
    mode: str,
    streams: tuple[torch.cuda.Stream, torch.cuda.Stream],
) -> tuple[Callable[[], contextlib.AbstractContextManager[Any]], set[int]] | None:
    started = time.perf_counter()
    length = bucket_for(min(_SELECTION_LENGTH, runner.cache.max_len), runner.length_buckets)
    keys = [(rows, length, 0, 0) for rows in runner.row_buckets]
    try:
        fused = FusedModules(model, runner.cache.layers, mode)
        _on_side_stream(device, [partial(_fused_call, fused, runner.forward, key) for key in keys])
    except Exception as exc:  # inductor's errors have no common base
        logger.warning("torch.compile failed, the decode step stays unfused: %s", exc)
        return None
    compile_s = time.perf_counter() - started
    timings, rows_used = [], set()
    with frozen_gc():
        for key in keys:
            plain_ms = _replay_ms(partial(runner.forward, key), device, streams)
            fused_ms = _replay_ms(partial(_fused_call, fused, runner.forward, key), device, streams)
            timings.append(f"{key[0]}: {plain_ms:.2f}/{fused_ms:.2f}")
            if fused_ms < plain_ms:
                rows_used.add(key[0])
    logger.info(
        "compiled the decode step's blocks (%s) in %.1f s; replay ms plain/compiled by rows at %d columns: %s; "
        "compiled step used for rows %s",
        mode,
        compile_s,
        length,
        ", ".join(timings),
        sorted(rows_used) or "none",
    )
    return fused.active, rows_used


def _compile_chunks(
    runner: StepRunner,
    model: torch.nn.Module,
    device: torch.device,
    streams: tuple[torch.cuda.Stream, torch.cuda.Stream],
) -> Callable[[], contextlib.AbstractContextManager[Any]] | None:
    rows = bucket_for(min(16, runner.cache.rows), runner.row_buckets)
    key = runner.key(rows, 64, runner.joining, min(2 * _SELECTION_LENGTH, runner.cache.max_len))
    if key is None or key not in runner.shapes:
        return None
    started = time.perf_counter()
    try:
        chunks = FusedModules(model, runner.cache.layers, "default")
        _on_side_stream(device, [partial(_fused_call, chunks, runner.forward, key)])
        with frozen_gc():
            plain_ms = _replay_ms(partial(runner.forward, key), device, streams)
            fused_ms = _replay_ms(partial(_fused_call, chunks, runner.forward, key), device, streams)
        if fused_ms < plain_ms:  # then every shape with a chunk the capture will run, compiled now
            shapes = [k for k in runner.shapes if k[2]]
            _on_side_stream(device, [partial(_fused_call, chunks, runner.forward, k) for k in shapes])
    except Exception as exc:
        logger.warning("torch.compile failed, the steps with a prompt chunk stay unfused: %s", exc)
        return None
    logger.info(
        "compiled the chunk steps' blocks (default) in %.1f s; replay ms plain/compiled of step %s: "
        "%.2f/%.2f; compiled chunks %s",
        time.perf_counter() - started,
        key,
        plain_ms,
        fused_ms,
        "used" if fused_ms < plain_ms else "not used",
    )
    return chunks.active if fused_ms < plain_ms else None


def _on_side_stream(device: torch.device, forwards: list[Callable[[], torch.Tensor]]) -> None:
    """Run ``forwards`` on a side stream (as the capture's warm-up does) and wait for them."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for forward in forwards:
            forward()
    torch.cuda.synchronize(device)


def _fused_call(fused: FusedModules, forward: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    with fused.active():
        return forward(*args)


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
