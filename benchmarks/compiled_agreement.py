"""The engine's compiled bf16 step against eager bf16 and a float32 reference, teacher-forced, per architecture.

Run: ``python benchmarks/compiled_agreement.py --archs llama,gemma2,qwen3_moe,gpt_oss`` (a GPU; ``--device cpu``
runs the same comparisons without graphs or compilation, as a smoke test of this script; ``--jobs N``
measures N architectures at once, each in a process of its own, since compiling each takes a CPU core
for a minute or two).

For each architecture of the coverage matrix (``tests/support/model_fixtures.py``, tiny random models loaded in
bfloat16), ``--rows`` random token sequences of ``--positions`` tokens go through:

- eager bf16: the model's own forward, all rows at once (batch ``rows``) and one row at a time (batch 1);
- fp32: the same forward on a float32 copy of the bf16 model, the very same bf16-rounded weights upcast, so
  that it differs from eager bf16 in arithmetic precision only;
- engine: the slotted cache with CUDA graphs and the steps compiled by ``torch.compile`` (inductor's
  ``default`` mode, used for every shape): the first ``--prefix`` tokens (8) as one packed chunk, then one
  decode step a position, each fed the sequence's true token (teacher forcing). A longer prefix puts the
  chunk's attention kernel on the path: a wrong chunk writes wrong keys and values for every later layer.

Over every position after the prefix it prints, for a pair of runs, the share of positions whose greedy next
token agrees and the mean absolute difference of the true next token's log-probability (|dlogp|):

- engine vs eager bf16 (batch ``rows``), and eager batch 1 vs batch ``rows``: the columns of earlier runs;
- eager bf16 batch ``rows``, eager bf16 batch 1 and the engine, each vs fp32.

Eager bf16 uses the same GEMM kernels at batch 1 and batch ``rows`` on an H100 (bitwise equal results), so
the batch spread is no yardstick for the engine; distance from fp32 is. The verdict checks the claim "the
compiled bf16 step is as close to fp32 as eager bf16 is": ``ok`` when the engine's |dlogp| vs fp32 is at most
1.25 x eager's, and its agreement with fp32 at least eager's less 1 point, eager's being the worse of its two
batch sizes (both are eager bf16). Compiled kernels fuse and reorder bf16 arithmetic, so the engine's error is
of eager's size but not equal to it; 25% and 1 point (about 3 of the default 288 positions) cover that and
the noise of a few hundred positions, while a wrong step (a stale cache slot, a shifted position, a wrong mask)
puts the engine many times further from fp32 than bf16 rounding does. Greedy output of random-weight models
parts at near ties between any two roundings, so the comparison is of these rates, not of tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import logging
import multiprocessing
import os
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "support")]

import torch  # noqa: E402
from model_fixtures import build_architecture  # noqa: E402

from chatstream_asgi.engines.transformers import TransformersEngine, compiled_step  # noqa: E402
from chatstream_asgi.engines.transformers.loading import load_model  # noqa: E402

LOGP_TOLERANCE = 1.25
"""The engine's |dlogp| vs fp32 may be this many times eager bf16's (see the module docstring)."""
AGREEMENT_TOLERANCE = 0.01
"""The engine's greedy agreement with fp32 may be this much below eager bf16's."""


def compare(a: torch.Tensor, b: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """(greedy agreement, mean |log p(target) difference|) of log-probabilities ``a`` and ``b`` ``[..., vocab]``."""
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    diff = (a.gather(1, targets[:, None]) - b.gather(1, targets[:, None])).abs().mean().item()
    return agree, diff


def eager(model: torch.nn.Module, ids: torch.Tensor, prefix: int, *, batched: bool) -> torch.Tensor:
    """The model's forward: float32 log-probabilities ``[rows, positions - prefix, vocab]`` of the tokens after
    the first ``prefix``, all rows in one batch (``batched``) or one row at a time."""
    batches = [ids] if batched else ids.split(1)
    return torch.cat([model(b).logits for b in batches]).float().log_softmax(-1)[:, prefix - 1 : -1]


def engine_logprobs(
    model: torch.nn.Module, tokenizer: object, ids: torch.Tensor, prefix: int, device: str
) -> torch.Tensor:
    """The engine's teacher-forced log-probabilities, shaped as :func:`eager`'s: the first ``prefix`` tokens
    of every row as one packed chunk, then one decode step a position (graphs and compiled on CUDA only)."""
    rows, positions = ids.shape
    timings = iter([1.0, 0.5] * 1000)  # plain, then compiled, for every selection: the compiled step is used
    compiled_step._replay_ms = lambda *args: next(timings)
    cuda = device.startswith("cuda")  # elsewhere (a smoke test of this script): no graphs, not compiled
    engine = TransformersEngine(
        model, tokenizer, device, static_cache=True, max_batch_size=rows, compile_mode="default" if cuda else None
    )
    asyncio.run(engine.start())
    runner = engine._path.runner
    assert runner.graphs or not cuda, "the steps were not captured"
    chunks = [(i, 0, ids[i, :prefix].tolist(), True) for i in range(rows)]
    steps = [runner.launch(torch.zeros(0, dtype=torch.long), None, chunks).float().log_softmax(-1)]
    for p in range(prefix, positions - 1):
        logits = runner.launch(torch.full((rows,), p), ids[:, p].tolist(), [])
        steps.append(logits.float().log_softmax(-1))
    asyncio.run(engine.shutdown())
    return torch.stack(steps, dim=1)


@torch.inference_mode()
def measure(
    name: str, rows: int, positions: int, prefix: int, directory: Path, device: str
) -> dict[str, tuple[float, float]]:
    """(agreement, mean |dlogp|) of each compared pair of runs of architecture ``name``, by column (eager: bf16
    batch ``rows``; b1: bf16 one row at a time)."""
    build_architecture(directory, name, max_position_embeddings=1024)
    model, tokenizer, _ = load_model(str(directory), device=device, dtype="bfloat16")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(tokenizer), (rows, positions), generator=generator).to(device)
    targets = ids[:, prefix:].reshape(-1)
    batch, alone = eager(model, ids, prefix, batched=True), eager(model, ids, prefix, batched=False)
    reference = eager(copy.deepcopy(model).float(), ids, prefix, batched=True)  # before the engine changes the model
    served = engine_logprobs(model, tokenizer, ids, prefix, device)
    return {
        "engine vs eager": compare(served, batch, targets),
        "eager b1 vs b rows": compare(alone, batch, targets),
        "eager vs fp32": compare(batch, reference, targets),
        "eager b1 vs fp32": compare(alone, reference, targets),
        "engine vs fp32": compare(served, reference, targets),
    }


def measure_one(name: str, rows: int, positions: int, prefix: int, device: str) -> dict[str, tuple[float, float]]:
    """:func:`measure` of architecture ``name`` in a directory of its own, as a worker process runs it."""
    logging.basicConfig(format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("chatstream_asgi").setLevel(logging.INFO)
    torch.set_float32_matmul_precision("highest")  # the fp32 reference in full float32: no TF32
    with tempfile.TemporaryDirectory() as directory:
        return measure(name, rows, positions, prefix, Path(directory), device)


def verdict(result: dict[str, tuple[float, float]]) -> str:
    """``ok`` where the engine is as close to fp32 as eager bf16 (the worse of its batch sizes), within the
    tolerances; else what it missed."""
    agree = min(result["eager vs fp32"][0], result["eager b1 vs fp32"][0])
    diff = max(result["eager vs fp32"][1], result["eager b1 vs fp32"][1])
    engine_agree, engine_diff = result["engine vs fp32"]
    missed: list[str] = []
    if engine_diff > LOGP_TOLERANCE * diff:
        missed.append(f"|dlogp| {engine_diff:.4f} > {LOGP_TOLERANCE} x {diff:.4f}")
    if engine_agree < agree - AGREEMENT_TOLERANCE:
        missed.append(f"agreement {100 * (engine_agree - agree):+.1f} points")
    return "; ".join(missed) or "ok"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default="llama,gemma2,qwen3_moe,gpt_oss")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--positions", type=int, default=80, help="tokens a row (rows x (positions - prefix) compared)")
    parser.add_argument("--prefix", type=int, default=8, help="tokens a row in the first (chunk) step")
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--jobs", type=int, default=1, help="architectures measured at once, each in a process (compiling is CPU-bound)"
    )
    args = parser.parse_args()
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(
        f"torch {torch.__version__}, {card}, bfloat16, {args.rows} rows x {args.positions - args.prefix} positions, "
        "teacher-forced; each cell: greedy agreement, mean |dlogp|"
    )
    names = args.archs.split(",")
    one = partial(measure_one, rows=args.rows, positions=args.positions, prefix=args.prefix, device=args.device)
    if args.jobs > 1:  # spawned: a forked child would inherit the parent's CUDA state; printed as each ends
        pool = ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"))
        futures = {pool.submit(one, name): name for name in names}
        results = ((futures[future], future.result()) for future in as_completed(futures))
    else:
        pool, results = None, ((name, one(name)) for name in names)
    for i, (name, result) in enumerate(results):
        if i == 0:
            print(" | ".join(["arch", *result, "verdict"]))
        cells = [f"{agree:.4f}, {diff:.4f}" for agree, diff in result.values()]
        print(" | ".join([name, *cells, verdict(result)]), flush=True)
    if pool is not None:
        pool.shutdown()


if __name__ == "__main__":
    main()
