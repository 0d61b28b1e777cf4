"""The engine's compiled bfloat16 step against eager bfloat16, teacher-forced, per architecture (CUDA).

Run: ``python benchmarks/compiled_agreement.py --archs llama,gemma2,qwen3_moe,gpt_oss`` (needs a GPU).

For each architecture of the coverage matrix (``tests/support/model_fixtures.py``, tiny random models in
bfloat16), ``--rows`` random token sequences of ``--positions`` tokens go through:

- eager: the model's own forward, all rows at once (batch ``rows``) and one row at a time (batch 1);
- engine: the slotted cache with CUDA graphs and the steps compiled by ``torch.compile`` (inductor's
  ``default`` mode, used for every shape): the first 8 tokens as one packed chunk, then one decode step a
  position, each fed the sequence's true token (teacher forcing).

It prints, over every position after the first 8, the share of positions whose greedy next token agrees
and the mean absolute difference of the true next token's log-probability: engine against eager (batch
``rows``), and eager batch 1 against eager batch ``rows``, the spread bfloat16 itself shows between batch
sizes. Greedy output of random-weight models parts at near ties between any two bfloat16 kernels, so the
comparison is of these rates, not of tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "support")]

import torch  # noqa: E402
from model_fixtures import build_architecture  # noqa: E402

from chatstream_asgi.engines.transformers import TransformersEngine, compiled_step  # noqa: E402
from chatstream_asgi.engines.transformers.loading import load_model  # noqa: E402

PREFIX = 8


def compare(a: torch.Tensor, b: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """(greedy agreement, mean |log p(target) difference|) of log-probabilities ``a`` and ``b`` ``[n, vocab]``."""
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    diff = (a.gather(1, targets[:, None]) - b.gather(1, targets[:, None])).abs().mean().item()
    return agree, diff


@torch.inference_mode()
def measure(name: str, rows: int, positions: int, directory: Path, device: str) -> tuple[float, float, float, float]:
    build_architecture(directory, name, max_position_embeddings=1024)
    model, tokenizer, _ = load_model(str(directory), device=device, dtype="bfloat16")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(tokenizer), (rows, positions), generator=generator).to(device)
    eager = model(ids).logits.float().log_softmax(-1)[:, PREFIX - 1 : -1]
    alone = torch.cat([model(ids[i : i + 1]).logits for i in range(rows)]).float().log_softmax(-1)[:, PREFIX - 1 : -1]
    timings = iter([1.0, 0.5] * 1000)  # plain, then compiled, for every selection: the compiled step is used
    compiled_step._replay_ms = lambda *args: next(timings)
    cuda = device.startswith("cuda")  # elsewhere (a smoke test of this script): no graphs, not compiled
    engine = TransformersEngine(
        model, tokenizer, device, static_cache=True, max_batch_size=rows, compile_mode="default" if cuda else None
    )
    asyncio.run(engine.start())
    runner = engine._path.runner
    assert runner.graphs or not cuda, "the steps were not captured"
    chunks = [(i, 0, ids[i, :PREFIX].tolist(), True) for i in range(rows)]
    steps = [runner.launch(torch.zeros(0, dtype=torch.long), None, chunks).float().log_softmax(-1)]
    for p in range(PREFIX, positions - 1):
        logits = runner.launch(torch.full((rows,), p), ids[:, p].tolist(), [])
        steps.append(logits.float().log_softmax(-1))
    asyncio.run(engine.shutdown())
    served = torch.stack(steps, dim=1)  # [rows, positions - PREFIX, vocab]
    targets = ids[:, PREFIX:].reshape(-1)
    vocab = served.shape[-1]
    engine_agree, engine_diff = compare(served.reshape(-1, vocab), eager.reshape(-1, vocab), targets)
    batch_agree, batch_diff = compare(alone.reshape(-1, vocab), eager.reshape(-1, vocab), targets)
    return engine_agree, engine_diff, batch_agree, batch_diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default="llama,gemma2,qwen3_moe,gpt_oss")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--positions", type=int, default=80, help="tokens a row (rows x (positions - 8) compared)")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    logging.basicConfig(format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("chatstream_asgi").setLevel(logging.INFO)
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(f"torch {torch.__version__}, {card}, bfloat16, {args.rows} rows x "
          f"{args.positions - PREFIX} positions, teacher-forced")  # fmt: skip
    print("arch | engine vs eager: agreement, mean |dlogp| | eager batch 1 vs batch rows: agreement, mean |dlogp|")
    for name in args.archs.split(","):
        with tempfile.TemporaryDirectory() as directory:
            agree, diff, base_agree, base_diff = measure(name, args.rows, args.positions, Path(directory), args.device)
        print(f"{name} | {agree:.4f}, {diff:.4f} | {base_agree:.4f}, {base_diff:.4f}", flush=True)


if __name__ == "__main__":
    main()
