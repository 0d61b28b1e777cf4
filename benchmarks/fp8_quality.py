"""How far FP8 weights move SmolLM2's predictions, against the noise floor of the comparison itself.

Run: ``python benchmarks/fp8_quality.py`` (CPU, about five minutes on 2 cores). SmolLM2 is loaded once in
float32 (its GGUF dequantized: the only copy of its weights here) and read over the same text as
``quant_quality.py`` (teacher-forced, the repository's own prose). Each row rounds the decoder's linear
layers' weights (not the output layer, not the embeddings) and compares with a reference model:

- bf16 against float32: what rounding the whole model to bfloat16 moves (the floor under any bf16 row);
- weights times ``1 + r * N(0, 1)``: a perturbation of known size, to read the metrics by;
- FP8 weights only (e4m3, a float32 scale per output feature or per group of inputs): the weight-only
  kernel's arithmetic, ``x @ (w_fp8 * scale).T`` summed in float32, the output in the model's dtype;
  with some layers kept; int8 per channel beside it (the same bytes on a uniform grid);
- W8A8 (``quant_fp8.Fp8Linear`` as a GPU runs it above 16 rows: activations to e4m3 per token too).

Top-1 over all positions counts near-ties, which any rounding flips; the next column counts only the
positions where the reference's best token leads by at least one nat.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from quant_quality import compare, log_probs, text_ids
from torch import nn

from chatstream_asgi.engines.transformers.loading import load_model
from chatstream_asgi.engines.transformers.quant_fp8 import FP8_MAX, Fp8Linear

FP8 = torch.float8_e4m3fn


def fp8(weight: torch.Tensor, group: int | None) -> torch.Tensor:
    """``weight`` through e4m3 codes with a float32 scale per output feature (``group=None``) or per
    ``group`` inputs of it."""
    rows, cols = weight.shape
    blocks = weight.float().reshape(rows, -1, group or cols)
    scale = (blocks.abs().amax(dim=2, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    return ((blocks / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * scale).reshape(rows, cols)


def int8(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` through int8 codes with a scale per output feature: the same bytes, a uniform grid."""
    scale = weight.float().abs().amax(dim=1, keepdim=True) / 127
    return (weight.float() / scale).round().clamp(-127, 127) * scale


def noisy(weight: torch.Tensor, relative: float) -> torch.Tensor:
    """``weight`` times ``1 + relative * N(0, 1)``: a perturbation of known size, to calibrate the metrics."""
    generator = torch.Generator().manual_seed(0)
    return weight.float() * (1 + relative * torch.randn(weight.shape, generator=generator))


class WeightOnly(nn.Module):
    """A linear layer over rounded weights as the weight-only kernel computes it: float32 products and
    sums, the output in x's dtype."""

    def __init__(self, linear: nn.Linear, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("rounded", weight.float())
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = (x.float() @ self.rounded.t()).to(x.dtype)
        return out if self.bias is None else out + self.bias


def swapped(model: nn.Module, make: Callable[[nn.Linear], nn.Module], keep: set[str] = frozenset()) -> nn.Module:
    """A copy of ``model`` with each decoder ``nn.Linear`` (not the output layer, none named in ``keep``)
    replaced by ``make(linear)``."""
    model = copy.deepcopy(model)
    output = model.get_output_embeddings()
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and module is not output and not any(k in name for k in keep):
            model.set_submodule(name, make(module))
    return model


def rms_change(model: nn.Module, rounding: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """Root-mean-square change of the decoder's linear weights under ``rounding``, relative to their RMS."""
    output = model.get_output_embeddings()
    change = total = 0.0
    for module in model.modules():
        if type(module) is nn.Linear and module is not output:
            weight = module.weight.detach().float()
            change += (rounding(weight) - weight).square().sum().item()
            total += weight.square().sum().item()
    return (change / total) ** 0.5


def confident_top1(reference: torch.Tensor, candidate: torch.Tensor, margin: float) -> tuple[float, int]:
    """Top-1 agreement where the reference's best token leads its second by ``margin`` nats or more
    (no near-tie for a small perturbation to flip), and how many such positions."""
    best = reference.topk(2, dim=-1).values
    sure = best[:, 0] - best[:, 1] >= margin
    agree = reference.argmax(-1) == candidate.argmax(-1)
    return agree[sure].float().mean().item(), int(sure.sum())


def row(label: str, reference: torch.Tensor, candidate: torch.Tensor, targets: torch.Tensor) -> str:
    r = compare(reference, candidate, targets)
    sure, count = confident_top1(reference, candidate, 1.0)
    return (
        f"| {label} | {r['positions']:.0f} | {100 * r['top1']:.1f}% | {100 * sure:.1f}% ({count}) | "
        f"{r['abs_dlogp']:.4f} | {r['kl']:.4f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--positions", type=int, default=512)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    f32, tokenizer, _ = load_model(args.model, device="cpu", dtype="float32", quantization="none")
    f32.eval()
    ids = text_ids(tokenizer, args.positions)
    targets = ids[1:]
    bf16 = copy.deepcopy(f32).to(torch.bfloat16)
    ref = {"float32": log_probs(f32, ids, args.window), "bf16": log_probs(bf16, ids, args.window)}
    print(
        "| weights against reference | positions | top-1 | top-1 where the reference leads by 1 nat (positions) "
        "| mean abs dlogp | mean KL |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    print(row("bf16 vs float32 (the floor of every bf16 row)", ref["float32"], ref["bf16"], targets), flush=True)
    ends = {"layers.0.", f"layers.{len(bf16.model.layers) - 1}."}
    Round = Callable[[torch.Tensor], torch.Tensor]
    rows: list[tuple[str, nn.Module, str, Round, set[str]]] = [
        ("bf16 weights, float32 activations vs float32", f32, "float32", lambda w: w.bfloat16(), set()),
        ("weights x (1 + 0.3% noise), float32 vs float32", f32, "float32", lambda w: noisy(w, 0.003), set()),
        ("weights x (1 + 1% noise), float32 vs float32", f32, "float32", lambda w: noisy(w, 0.01), set()),
        ("FP8 weight-only per channel, float32 activations vs float32", f32, "float32", lambda w: fp8(w, None), set()),
        ("**FP8 weight-only per channel vs bf16** (the kernel)", bf16, "bf16", lambda w: fp8(w, None), set()),
        ("FP8 weight-only, a scale per 64 inputs vs bf16", bf16, "bf16", lambda w: fp8(w, 64), set()),
        ("FP8 weight-only, a scale per 32 inputs vs bf16", bf16, "bf16", lambda w: fp8(w, 32), set()),
        (
            "FP8 weight-only per channel, down_proj kept bf16 vs bf16",
            bf16,
            "bf16",
            lambda w: fp8(w, None),
            {"down_proj"},
        ),
        ("FP8 weight-only per channel, layers 0 and 29 kept bf16 vs bf16", bf16, "bf16", lambda w: fp8(w, None), ends),
        ("int8 weight-only per channel vs bf16 (same bytes, uniform grid)", bf16, "bf16", int8, set()),
    ]
    for label, base, against, rounding, keep in rows:
        model = swapped(base, lambda linear, r=rounding: WeightOnly(linear, r(linear.weight.detach())), keep)
        print(row(label, ref[against], log_probs(model, ids, args.window), targets), flush=True)
    roundings = {"bf16": lambda w: w.bfloat16(), "int8 per channel": int8, "e4m3 per channel": lambda w: fp8(w, None)}
    roundings["e4m3 per 32 inputs"] = lambda w: fp8(w, 32)
    changes = ", ".join(f"{name} {100 * rms_change(f32, r):.2f}%" for name, r in roundings.items())
    print(f"RMS change of the decoder's weights: {changes}")
    w8a8 = swapped(bf16, lambda linear: Fp8Linear(linear.weight, linear.bias))
    print(row("FP8 W8A8 (Fp8Linear, above 16 rows) vs bf16", ref["bf16"], log_probs(w8a8, ids, args.window), targets))


if __name__ == "__main__":
    main()
