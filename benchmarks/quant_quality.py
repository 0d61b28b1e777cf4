"""How far quantized weights move a model's predictions: teacher-forced agreement with the float model.

Run: ``.venv/bin/python benchmarks/quant_quality.py`` (SmolLM2 from its GGUF: the quantized model the
server loads by default against the same file dequantized to float32; about a minute on 2 cores).
``--quantization fp8`` compares FP8 layers (``torch._scaled_mm``, which PyTorch also runs on the CPU,
with the same rounding of weights and activations as on a GPU) against the model in bfloat16.

Both models read the same real text (this repository's README and docs, ``--positions`` tokens in
windows of ``--window``); at every position each predicts the next token. Printed: top-1 agreement
(the quantized model's most likely next token is the float model's), the mean difference of the
log-probability each gives the text's actual next token (quantized minus float), its mean absolute
value, and the mean KL divergence of the two next-token distributions.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from chatstream_asgi.engines.transformers.loading import load_model
from chatstream_asgi.engines.transformers.quant import quantize_model, weight_footprint

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ("README.md", "ARCHITECTURE.md", "docs")


def text_ids(tokenizer: Any, positions: int) -> torch.Tensor:
    """``positions + 1`` token ids of this repository's own English prose."""
    parts = []
    for name in TEXTS:
        path = ROOT / name
        files = sorted(path.glob("*.md")) if path.is_dir() else [path] if path.is_file() else []
        parts.extend(f.read_text() for f in files)
    ids = tokenizer("\n\n".join(parts), return_tensors="pt").input_ids[0]
    if len(ids) < positions + 1:
        raise SystemExit(f"only {len(ids)} tokens of text; ask for fewer --positions")
    return ids[: positions + 1]


@torch.inference_mode()
def log_probs(model: torch.nn.Module, ids: torch.Tensor, window: int) -> torch.Tensor:
    """float32 next-token log-probabilities ``[positions, vocab]``, windows of ``window`` tokens."""
    out = []
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : min(start + window, len(ids) - 1)].unsqueeze(0).to(model.device)
        out.append(torch.log_softmax(model(input_ids=chunk).logits[0].float(), dim=-1).cpu())
    return torch.cat(out)


def compare(reference: torch.Tensor, candidate: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Agreement of two ``[positions, vocab]`` log-probability tables on the text's next tokens."""
    rows = torch.arange(len(targets))
    delta = candidate[rows, targets] - reference[rows, targets]
    kl = (reference.exp() * (reference - candidate)).sum(-1)
    return {
        "top1": (reference.argmax(-1) == candidate.argmax(-1)).float().mean().item(),
        "dlogp": delta.mean().item(),
        "abs_dlogp": delta.abs().mean().item(),
        "kl": kl.mean().item(),
        "positions": len(targets),
    }


def measure(model_name: str, quantization: str | None, positions: int, window: int) -> dict[str, float]:
    """Load the float and the quantized model one after the other; compare them on the text."""
    fp8 = quantization == "fp8"
    reference, tokenizer, _ = load_model(
        model_name, device="cpu", dtype="bfloat16" if fp8 else None, quantization="none"
    )
    ids = text_ids(tokenizer, positions)
    started = time.perf_counter()
    ref = log_probs(reference, ids, window)
    ref_s = time.perf_counter() - started
    ref_bytes = weight_footprint(reference)[1]
    if fp8:  # the layers on the CPU: the loader offers fp8 on CUDA only
        quantize_model(reference, "fp8")
        model = reference
    else:
        del reference
        gc.collect()
        # transformers' model class: its forward gives every position's logits (the same quantized layers)
        model, _, _ = load_model(model_name, device="cpu", quantization=quantization, lean=False)
    started = time.perf_counter()
    cand = log_probs(model, ids, window)
    result = compare(ref, cand, ids[1:])
    result.update(ref_s=ref_s, quant_s=time.perf_counter() - started)
    result.update(ref_mb=ref_bytes / 2**20, quant_mb=weight_footprint(model)[1] / 2**20)
    return result


def report(label: str, r: dict[str, float]) -> str:
    return (
        f"| {label} | {r['positions']:.0f} | {100 * r['top1']:.1f}% | {r['dlogp']:+.4f} | {r['abs_dlogp']:.4f} | "
        f"{r['kl']:.4f} | {r['ref_mb']:.0f} -> {r['quant_mb']:.0f} MiB | {r['ref_s']:.2f} -> {r['quant_s']:.2f} s |"
    )


HEADER = (
    "| weights | positions | top-1 agreement | mean dlogp | mean abs dlogp | mean KL | weights | forward pass |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--quantization", default=None, choices=["int4", "int8", "fp8"], help="default: the file's")
    parser.add_argument("--positions", type=int, default=512)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = measure(args.model, args.quantization, args.positions, args.window)
    label = f"{args.model} {args.quantization or 'as the file holds them'}"
    print(HEADER)
    print(report(label, result))


if __name__ == "__main__":
    main()
