"""FP8 weights on a Hopper GPU: the engine's decode step with bf16 and with FP8 linear layers, side by side.

Run (one GPU, about 4 minutes): ``python benchmarks/quantized_gpu.py --config DIR`` with DIR holding
SmolLM2's config and tokenizer (the vocabulary; the 8B shape's dimensions are written over the config:
Llama-3.1-8B's hidden 4096, intermediate 14336, 32 layers, 32 heads, 8 key/value heads, rope theta
500000). Random weights (step times do not depend on the values), built on the GPU in bfloat16.

For each of bf16 and FP8 (``quantize_model(model, "fp8")``: the decoder's linear layers to e4m3 weights
with per-channel scales, run weight-only by ``fp8_gemv.py``'s Triton kernel up to 16 rows, so in the
1-sequence step, and W8A8 above, so in the ``--batch`` step and the prefill: per-token activation scales,
``torch._scaled_mm``; query/key/value and gate/up joined into one layer each unless ``--separate``), an
engine on the static cache with CUDA graphs (``--compile`` as asked, ``auto`` the engine's default; default
here: no compile) runs 1 and ``--batch`` concurrent greedy requests; the step time is the median gap between a
stream's tokens. Printed beside it: the weight bytes and the weight-read floor (bytes over a measured
device-to-device copy rate), and FP8's teacher-forced agreement with bf16 on the same random model
(top-1, mean |dlogp|, over the README's tokens in one prefill, so the W8A8 path): a random model's
near-uniform logits make this a check that FP8 computes the same function, not a quality number
(benchmarks/fp8_quality.py gives that on SmolLM2's weights). The engine's log (quantization, what the
compiled step was used for, the captures) is printed too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from engine_throughput import copy_bandwidth
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from chatstream_asgi.engines.base import GenerationParams, GenerationRequest
from chatstream_asgi.engines.transformers import TransformersEngine
from chatstream_asgi.engines.transformers.quant import quantize_model, weight_footprint

SHAPE_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "rope_theta": 500000.0,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": False,
}


@torch.inference_mode()
def log_probs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(model(input_ids=ids.unsqueeze(0).to(model.device)).logits[0].float(), dim=-1).cpu()


async def step_ms(engine: TransformersEngine, rows: int, tokens: int) -> float:
    """Median gap between consecutive tokens of ``rows`` concurrent greedy streams (the decode step)."""
    params = GenerationParams(temperature=0.0, max_new_tokens=tokens)
    gaps: list[float] = []

    async def one(i: int) -> None:
        messages = [{"role": "user", "content": f"Story {i}: tell me about the sea."}]
        last = None
        async for _ in engine.generate(GenerationRequest(f"r{i}", messages, params, ignore_eos=True)):
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            last = now

    await asyncio.gather(*(one(i) for i in range(rows)))
    return 1000 * statistics.median(gaps)


def run_engine(model: torch.nn.Module, tokenizer: object, args: argparse.Namespace, compile_mode: object) -> dict:
    engine = TransformersEngine(
        model, tokenizer, model.device, max_batch_size=args.batch, context_len=1024, compile_mode=compile_mode
    )

    async def go() -> dict[int, float]:
        started = time.perf_counter()
        await engine.start()
        print(f"  engine start (cache, graphs, compile {compile_mode}): "
              f"{time.perf_counter() - started:.1f} s", flush=True)  # fmt: skip
        await step_ms(engine, 2, 4)  # warm-up
        result = {rows: await step_ms(engine, rows, args.tokens) for rows in (1, args.batch)}
        await engine.shutdown()
        return result

    return asyncio.run(go())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="directory with SmolLM2's config.json and tokenizer")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--compile", default=None, help="the engine's compile_mode (default: none; graphs only)")
    parser.add_argument("--compiled-check", default=None, metavar="MODE",
                        help="then the FP8 engine again with this compile_mode, if --budget seconds allow")  # fmt: skip
    parser.add_argument("--budget", type=float, default=150, help="seconds after which the compiled check is skipped")
    parser.add_argument("--out", default=None, help="write the results as JSON here too")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to smoke-test this script")
    parser.add_argument("--config-shape", action="store_true", help="the config's own shape, not the 8B one")
    parser.add_argument("--separate", action="store_true", help="FP8 layers not joined (q/k/v, gate/up apart)")
    args = parser.parse_args()
    logging.basicConfig(format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("chatstream_asgi").setLevel(logging.INFO)  # the quantization, compile and capture lines
    began = time.perf_counter()
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{where}, torch {torch.__version__}", flush=True)
    config = AutoConfig.from_pretrained(args.config)
    for key, value in {} if args.config_shape else SHAPE_8B.items():
        setattr(config, key, value)
    tokenizer = AutoTokenizer.from_pretrained(args.config)
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.eval()
    bandwidth = copy_bandwidth(device)
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    ids = tokenizer(text, return_tensors="pt").input_ids[0][:513]
    results: dict[str, dict[str, object]] = {}
    reference = log_probs(model, ids)
    for name in ("bf16", "fp8"):
        if name == "fp8":
            quantize_model(model, "fp8", join=not args.separate)
            candidate = log_probs(model, ids)
            rows = torch.arange(len(ids) - 1)
            delta = candidate[rows, ids[1:]] - reference[rows, ids[1:]]
            agreement = (candidate.argmax(-1) == reference.argmax(-1)).float().mean().item()
            results["agreement"] = {"top1": agreement, "abs_dlogp": delta.abs().mean().item(), "positions": len(rows)}
            print(f"  fp8 vs bf16, teacher-forced on {len(rows)} positions: top-1 {100 * agreement:.1f}%, "
                  f"mean |dlogp| {delta.abs().mean().item():.4f}", flush=True)  # fmt: skip
        size = weight_footprint(model)[1]
        print(f"{name}: weights {size / 1e9:.2f} GB, floor {1000 * size / bandwidth:.2f} ms", flush=True)
        steps = run_engine(model, tokenizer, args, args.compile)
        results[name] = {"weight_bytes": size, "floor_ms": 1000 * size / bandwidth, "step_ms": steps}
        print(f"  step ms: {steps}", flush=True)
    print(f"\ncopy bandwidth {bandwidth / 1e9:.0f} GB/s; CUDA graphs, compile {args.compile}; {args.tokens} tokens")
    print("| weights | GB | floor ms | step ms, 1 seq | floor/step | step ms, " + f"{args.batch} seqs |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in ("bf16", "fp8"):
        r = results[name]
        s = r["step_ms"]
        print(f"| {name} | {r['weight_bytes'] / 1e9:.2f} | {r['floor_ms']:.2f} | {s[1]:.2f} | "  # type: ignore[index]
              f"{r['floor_ms'] / s[1]:.2f} | {s[args.batch]:.2f} |")  # type: ignore[index]  # fmt: skip
    bf, fp = results["bf16"]["step_ms"], results["fp8"]["step_ms"]
    print(f"fp8 speed-up: {bf[1] / fp[1]:.2f}x at 1 sequence, {bf[args.batch] / fp[args.batch]:.2f}x at {args.batch}")  # type: ignore[index]
    if args.compiled_check and time.perf_counter() - began < args.budget:
        print(f"\nfp8 again, compiled ({args.compiled_check}):", flush=True)
        try:
            results["fp8_compiled"] = {"step_ms": run_engine(model, tokenizer, args, args.compiled_check)}
            print(f"  step ms: {results['fp8_compiled']['step_ms']}", flush=True)
        except Exception as exc:  # report, keep the table above
            print(f"  compiled fp8 failed: {type(exc).__name__}: {exc}", flush=True)
    elif args.compiled_check:
        print(f"\ncompiled check skipped: {time.perf_counter() - began:.0f} s gone of a {args.budget:.0f} s budget")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
