"""A GGUF model loaded with its Q4_0, Q4_1 and Q8_0 matrices kept quantized (CPU).

transformers' GGUF loader dequantizes every tensor to the model's dtype (SmolLM2-135M: 85 MB of
Q4_1 blocks become 540 MB of float32, all read at every step). Here the model is built on the meta
device from the file's config; each block matrix that feeds an ``nn.Linear`` becomes an
:class:`~.quant_cpu.Int4Linear` on the file's own codes (Q4_0, Q4_1; Q8_0 as two 4-bit halves), a Q8_0
embedding table an :class:`~.quant_cpu.Int8Embedding`, straight from the file's bytes, and the output layer
(its top logits need float32) a :class:`~.quant_cpu.RescoredHead` over that table where it is tied to it,
else an :class:`~.quant_cpu.Fp16Linear`; everything else (norms,
other types) is dequantized as transformers does it, through transformers' own name map and tensor
processor. A processor that reorders rows (Llama's query and key heads) is applied to the rows'
indices and then to the blocks, which reorders codes and scales together: exact.

Only architectures whose processor does nothing but reorder rows take this path
(:data:`ROW_PROCESSORS`); :func:`load_gguf_quantized` returns None for the others and the caller
loads the model dequantized, as before.

Two builders share the filling: :func:`load_gguf_quantized` fills transformers' model class (built from
transformers' config of the file); :func:`load_gguf_lean` fills a :class:`~.lean_model.LeanLlama`, without
importing transformers' modeling code, where :func:`lean_config` finds the file a Llama it holds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from chatstream_asgi.engines.transformers.gguf_blocks import BLOCK_TYPES, Blocks, read_blocks
from chatstream_asgi.engines.transformers.lean_model import LeanConfig, LeanLlama
from chatstream_asgi.engines.transformers.quant_cpu import (
    Fp16Linear,
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    RescoredHead,
    fp16_available,
    int4_fits,
    kernels_available,
)

__all__ = ["ROW_PROCESSORS", "lean_config", "load_gguf_lean", "load_gguf_quantized"]

logger = logging.getLogger("chatstream_asgi.engine")

_M = TypeVar("_M", bound=nn.Module)

ROW_PROCESSORS = ("TensorProcessor", "LlamaTensorProcessor")
"""transformers' GGUF tensor processors that at most reorder a matrix's rows."""


def load_gguf_quantized(source: str, gguf_file: str, dtype: torch.dtype, **kwargs: Any) -> nn.Module | None:
    """The model in ``source``/``gguf_file`` on the CPU with its block matrices quantized, or None when
    the file holds none or its architecture needs more than row reordering (load it dequantized then)."""
    from gguf import GGUFReader
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    if not kernels_available():
        logger.info("PyTorch %s has no CPU int4/int8 weight-packed matmuls (2.6+): the GGUF loads dequantized",
                    torch.__version__)  # fmt: skip
        return None
    reader = GGUFReader(str(Path(source, gguf_file)))
    field = reader.fields["general.architecture"]
    architecture = bytes(field.parts[field.data[0]]).decode()
    processor_class = TENSOR_PROCESSORS.get(architecture, TensorProcessor)
    if processor_class.__name__ not in ROW_PROCESSORS:
        logger.info("GGUF architecture %s: its tensors need conversions beyond row order; loading it dequantized",
                    architecture)  # fmt: skip
        return None
    if not any(int(t.tensor_type) in BLOCK_TYPES for t in reader.tensors):
        return None
    config = AutoConfig.from_pretrained(source, gguf_file=gguf_file, **kwargs)
    config.name_or_path = source
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return _filled(model, reader, processor_class(config=config.to_dict()), dtype)


@dataclasses.dataclass(frozen=True)
class LeanSource:
    """A GGUF file a :class:`~.lean_model.LeanLlama` holds: its config and its parsed reader."""

    config: LeanConfig
    reader: Any


def lean_config(source: str, gguf_file: str) -> LeanSource | None:
    """The config of the model in ``source``/``gguf_file`` where a :class:`~.lean_model.LeanLlama` holds it (a
    Llama whose config holds nothing else, and PyTorch has the CPU int4 kernels), with the reader that
    transformers parsed the file's metadata into: :func:`load_gguf_lean` reads the tensors from it instead of
    parsing the file again (the tokenizer's 49,152 tokens and merges: 2.3 s on 2 cores). Else None."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    if not kernels_available():
        return None
    with _kept_readers() as readers:
        values = load_gguf_checkpoint(str(Path(source, gguf_file)), return_tensors=False)["config"]
    config = LeanConfig.of(values, source)
    return LeanSource(config, readers[-1]) if config is not None and readers else None


def load_gguf_lean(lean: LeanSource) -> LeanLlama:
    """The model :func:`lean_config` found as a float32 :class:`~.lean_model.LeanLlama`, its block matrices
    quantized as :func:`load_gguf_quantized` keeps them."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    with torch.device("meta"):
        model = LeanLlama(lean.config)
    processor = LlamaTensorProcessor(config=dataclasses.asdict(lean.config))
    return _filled(model, lean.reader, processor, torch.float32)


@contextlib.contextmanager
def _kept_readers() -> Iterator[list[Any]]:
    """The ``gguf.GGUFReader`` objects made meanwhile (transformers makes its own inside
    ``load_gguf_checkpoint``), kept in the list yielded."""
    readers: list[Any] = []

    def keeping(made: type) -> type:
        class Kept(made):  # type: ignore[misc, valid-type]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                readers.append(self)

        return Kept

    with _gguf_stand_in("GGUFReader", keeping):
        yield readers


def _filled(model: _M, reader: Any, processor: Any, dtype: torch.dtype) -> _M:
    """``model`` (built on the meta device) with ``reader``'s tensors through transformers' name map and
    ``processor``: block matrices kept quantized (:func:`_swap_modules`), the rest dequantized to ``dtype``."""
    from gguf import dequantize as gguf_dequantize

    names = weights_map(model, processor)
    state: dict[str, torch.Tensor] = {}
    blocks: dict[str, Blocks] = {}
    for tensor in reader.tensors:
        target = names.get(tensor.name)
        if target is None:
            continue
        kind = int(tensor.tensor_type)
        module = model.get_submodule(target.rpartition(".")[0])
        if kind in BLOCK_TYPES and target.endswith(".weight") and isinstance(module, (nn.Linear, nn.Embedding)):
            found = read_blocks(tensor.data, kind, int(tensor.shape[0]))
            blocks[target] = found.rows(_row_order(processor, tensor.name, found.shape[0]))
            continue
        weights = processor.process(weights=gguf_dequantize(tensor.data, tensor.tensor_type), name=tensor.name).weights
        state[target] = torch.from_numpy(np.array(weights, dtype=np.float32)).to(dtype)  # a copy: not the file's map
    model.load_state_dict(state, strict=False, assign=True)
    kinds = _swap_modules(model, blocks, dtype)
    _materialize_buffers(model)
    model.eval()
    logger.info("GGUF matrices kept quantized: %s", ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
    return model


def weights_map(model: nn.Module, processor: Any) -> dict[str, str]:
    """transformers' map from the file's tensor names to ``model``'s, with gguf's name map built once.

    ``get_gguf_hf_weights_map`` recurses into every submodule and builds gguf's ``TensorNameMap`` at each:
    367 times for SmolLM2, about 12 ms each, 4.6 of the 10.5 s its load took on 2 cores. That map depends
    only on the architecture and the layer count, so for the call gguf's builder is cached (under a lock:
    a load in another thread meanwhile gets the same maps).
    """
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    with _gguf_stand_in("get_tensor_name_map", functools.cache):
        return get_gguf_hf_weights_map(model, processor)


@contextlib.contextmanager
def _gguf_stand_in(name: str, wrap: Callable[[Any], Any]) -> Iterator[None]:
    """gguf's module attribute ``name`` is ``wrap(original)`` meanwhile (transformers imports it from gguf at
    each call), under a lock: a load in another thread waits rather than wrapping the stand-in."""
    import gguf

    with _GGUF_NAMES:
        original = getattr(gguf, name)
        setattr(gguf, name, wrap(original))
        try:
            yield
        finally:
            setattr(gguf, name, original)


_GGUF_NAMES = threading.Lock()
"""Held while :func:`_gguf_stand_in` replaces one of gguf's module attributes."""


def _row_order(processor: Any, name: str, rows: int) -> np.ndarray:
    """The row permutation ``processor`` applies to tensor ``name`` (learned on the rows' indices)."""
    index = np.arange(rows).reshape(rows, 1)
    order = np.asarray(processor.process(weights=index, name=name).weights).reshape(-1)
    if order.shape != (rows,) or not np.array_equal(np.sort(order), np.arange(rows)):
        raise ValueError(f"the GGUF processor changes {name} beyond its row order")
    return order


def _swap_modules(model: nn.Module, blocks: dict[str, Blocks], dtype: torch.dtype) -> Counter[str]:
    """Replace each module whose weight is in ``blocks``; an output layer tied to a quantized table too."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    kinds: Counter[str] = Counter()
    tables: dict[int, tuple[Int8Embedding, Blocks]] = {}  # each quantized table and its blocks, by its (meta) weight
    for target, found in blocks.items():
        name = target.rpartition(".")[0]
        module = model.get_submodule(name)
        if isinstance(module, nn.Embedding) and found.bits == 8:
            new: nn.Module = Int8Embedding(found, dtype)
            tables[id(module.weight)] = new, found
        elif isinstance(module, nn.Embedding):  # a 4-bit table would need a kernel to gather rows: dequantized
            module.weight = nn.Parameter(torch.from_numpy(found.dequantize()).to(dtype), requires_grad=False)
            kinds[f"{found.kind} table dequantized"] += 1
            continue
        else:
            new = _linear(found, module, module is output)
        kinds[f"{found.kind}->{_what(new)}"] += 1
        model.set_submodule(name, new)
    if isinstance(output, nn.Linear) and output.weight.is_meta and id(output.weight) in tables:
        name = next(n for n, m in model.named_modules() if m is output)
        table, found = tables[id(output.weight)]
        new = RescoredHead(table) if int4_fits(*found.shape) else _linear(found, output, True)
        kinds[f"tied output->{_what(new)}"] += 1
        model.set_submodule(name, new)
    return kinds


def _linear(found: Blocks, module: nn.Linear, output: bool) -> nn.Module:
    """The output layer in float16 (its logits need float32 accumulation and output), where fbgemm runs;
    the others on the file's codes."""
    if output and fp16_available():
        return Fp16Linear(torch.from_numpy(found.dequantize()), module.bias, kind=found.kind)
    if int4_fits(*found.shape):
        return Int4Linear(found, module.bias)
    return Int8Linear.from_blocks(found, module.bias)


def _what(module: nn.Module) -> str:
    names = {Int8Embedding: "table kept", Int4Linear: "int4", Int8Linear: "int8 (per row)", Fp16Linear: "fp16",
             RescoredHead: "int4 ranking, table rescoring"}  # fmt: skip
    what = names[type(module)]
    return "int4 x2 (exact)" if what == "int4" and module.packed.shape[0] == 2 else what  # type: ignore[union-attr]


def _materialize_buffers(model: nn.Module) -> None:
    """Compute what the file does not hold (rotary frequencies, ...) as transformers' loading does."""
    for module in model.modules():
        if any(t.is_meta for t in module.buffers(recurse=False)):
            module.to_empty(device="cpu", recurse=False)
            model._init_weights(module)  # type: ignore[operator]
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"the GGUF file does not hold {', '.join(left[:5])}")
