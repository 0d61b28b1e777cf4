"""Prefix reuse on and off, side by side: time to first token over a long chat, and a shared system prompt.

Run: ``python benchmarks/prefix_reuse.py`` (SmolLM2-135M-Instruct on CPU by default; ``--quick`` for a
short smoke run, ``--device cuda`` / ``--model`` for other shapes, ``--random-init DIR`` for a shape
from a config and tokenizer with random weights, as in engine_throughput.py).

1. **A 10-turn conversation**: each turn adds a user message of about 100 tokens and a reply of 30
   generated tokens (greedy, EOS ignored), so the history nears 1,500 tokens by turn 10. It prints the
   time to first token of every turn with reuse on and off, the prompt tokens, the tokens reused, and
   the hit rate: reused / (prompt tokens - the turn's new tokens), where the new tokens are those of
   the text the turn adds after the previous prompt and its reply (the end of the reply's turn in the
   chat template and the new user message). Below 100% means the next prompt's token ids differ from
   the ones held (the engine builds them from the generated ids; see ``SessionTurns``) or the last
   reply token's keys were never computed (it is the one not fed back). The conversation is run
   ``--repeat`` times, what it left released between runs (``release_session``), and the best time
   taken per turn (the machine is shared: the least disturbed run is the closest to the engine's own
   cost; greedy replies make every run's tokens the same); runs with reuse on and off alternate, two engines on
   one model, so other load falls on both alike. ``--static`` runs the static slot cache (CUDA's
   default) on any device; ``--stop-at-eos`` lets replies end at EOS, as served replies do.
2. **16 concurrent conversations sharing one 300-token system prompt**, two turns each (a turn is sent
   when the conversation's last one ends), after one earlier conversation with that system prompt:
   prefill tokens per request (what the engine computed), tokens reused, and aggregate generated
   tokens/s over the wall time of all 32 requests.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from chatstream_asgi.engines.base import GenerationParams, GenerationRequest
from chatstream_asgi.engines.transformers import TransformersEngine
from chatstream_asgi.engines.transformers.loading import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_throughput import random_model

WORDS = [
    "river", "stone", "lantern", "orchard", "signal", "harbor", "meadow", "copper", "thunder", "velvet", "canyon",
    "ember", "quartz", "willow", "saddle", "prism", "falcon", "marble", "tundra", "cipher", "beacon", "glacier",
    "harvest", "nickel", "opal", "pepper", "quiver", "rocket",
]  # fmt: skip


def user_message(conversation: int, turn: int, words: int) -> str:
    """About ``words`` words of distinct text per conversation and turn."""
    picked = [WORDS[(conversation * 7 + turn * 3 + i * i) % len(WORDS)] for i in range(words)]
    return f"Conversation {conversation}, question {turn}: tell me about " + " ".join(picked) + "."


IGNORE_EOS = True


def new_tokens(engine: TransformersEngine, before: list[dict], reply: str, messages: list[dict]) -> int:
    """Tokens of the text ``messages`` adds after ``before``'s prompt and ``reply`` (all, if not continuing it)."""
    text = engine.render_prompt(messages)
    held = engine.render_prompt(before) + reply if before else None
    added = text[len(held) :] if held is not None and text.startswith(held) else text
    return len(engine.tokenizer(added, add_special_tokens=False)["input_ids"])


async def turn(engine: TransformersEngine, messages: list[dict], params: GenerationParams, key: str) -> dict[str, Any]:
    """One request: its reply, time to first token, prompt/reused/generated token counts."""
    start = time.perf_counter()
    stream = engine.generate(GenerationRequest(key, messages, params, ignore_eos=IGNORE_EOS, session_key=key))
    first = None
    parts = []
    async for delta in stream:
        if first is None:
            first = time.perf_counter() - start
        parts.append(delta)
    return {
        "text": "".join(parts),
        "ttft": first or 0.0,
        "prompt": stream.prompt_tokens,
        "reused": stream.cached_tokens,
        "generated": stream.completion_tokens,
    }


async def long_chat(engine: TransformersEngine, turns: int, words: int, reply: int, key: int) -> list[dict]:
    params = GenerationParams(temperature=0.0, max_new_tokens=reply)
    messages: list[dict] = []
    results = []
    before: list[dict] = []
    for t in range(turns):
        messages.append({"role": "user", "content": user_message(key, t, words)})
        result = await turn(engine, messages, params, f"chat-{key}")
        result["new"] = new_tokens(engine, before, results[-1]["text"] if results else "", messages)
        before = list(messages)
        messages.append({"role": "assistant", "content": result["text"]})
        results.append(result)
    engine.release_session(f"chat-{key}")
    return results


async def shared_system(engine: TransformersEngine, system: str, conversations: int, reply: int) -> dict[str, float]:
    params = GenerationParams(temperature=0.0, max_new_tokens=reply)

    async def conversation(c: int) -> list[dict]:
        messages = [{"role": "system", "content": system}]
        out = []
        for t in range(2):
            messages.append({"role": "user", "content": user_message(100 + c, t, 12)})
            result = await turn(engine, messages, params, f"shared-{c}")
            messages.append({"role": "assistant", "content": result["text"]})
            out.append(result)
        return out

    await conversation(99)  # an earlier conversation with the same system prompt
    before = engine.prefill_tokens, engine.prefix_hit_tokens
    start = time.perf_counter()
    results = [r for rs in await asyncio.gather(*(conversation(c) for c in range(conversations))) for r in rs]
    wall = time.perf_counter() - start
    for c in [99, *range(conversations)]:
        engine.release_session(f"shared-{c}")
    return {
        "prompt": statistics.mean(r["prompt"] for r in results),
        "prefill": (engine.prefill_tokens - before[0]) / len(results),
        "reused": (engine.prefix_hit_tokens - before[1]) / len(results),
        "tokens_per_s": sum(r["generated"] for r in results) / wall,
        "ttft_p50": statistics.median(r["ttft"] for r in results),
    }


async def measure(engines: dict[bool, TransformersEngine], args: argparse.Namespace, system: str) -> dict:
    """Both engines (reuse on, off), their runs interleaved so that the machine's other load hits both alike."""
    runs: dict[bool, list[list[dict]]] = {True: [], False: []}
    results: dict[bool, dict[str, Any]] = {}
    for engine in engines.values():
        await engine.start()
        await long_chat(engine, 2, 10, 8, key=1000)  # warm-up
    try:
        for r in range(args.repeat):
            for reuse, engine in engines.items():
                print(f"conversation {r + 1}/{args.repeat}, reuse {'on' if reuse else 'off'}", file=sys.stderr)
                runs[reuse].append(await long_chat(engine, args.turns, args.words, args.reply, key=0))
        for reuse, engine in engines.items():
            print(f"shared system prompt, reuse {'on' if reuse else 'off'}", file=sys.stderr)
            per_turn = [
                {"ttft": min(run[t]["ttft"] for run in runs[reuse])}
                | {name: runs[reuse][0][t][name] for name in ("prompt", "reused", "generated", "new")}
                for t in range(args.turns)
            ]
            results[reuse] = {
                "turns": per_turn,
                "shared": await shared_system(engine, system, args.conversations, args.reply),
            }
    finally:
        for engine in engines.values():
            await engine.shutdown()
    return results


def system_prompt(tokenizer: Any, tokens: int) -> str:
    text = "You are a careful assistant for a travel company. " + " ".join(WORDS[i % len(WORDS)] for i in range(400))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
    return tokenizer.decode(ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--words", type=int, default=80, help="words per user message (about 100 tokens)")
    parser.add_argument("--reply", type=int, default=30, help="generated tokens per reply")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--system-tokens", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="3 turns, 1 run, 4 conversations")
    parser.add_argument("--static", action="store_true", help="the static slot cache (default on CUDA) on any device")
    parser.add_argument("--context-len", type=int, help="default: the model's (the static cache allocates 16 of it)")
    parser.add_argument("--stop-at-eos", action="store_true", help="replies end at EOS (default: exactly --reply)")
    parser.add_argument("--random-init", metavar="DIR", help="config + tokenizer in DIR, random weights (GPU shapes)")
    args = parser.parse_args()
    global IGNORE_EOS
    IGNORE_EOS = not args.stop_at_eos
    if args.quick:
        args.turns, args.repeat, args.conversations = 3, 1, 4
    logging.basicConfig(level=logging.WARNING)
    if args.random_init:
        model, tokenizer, name = random_model(args.random_init, args.device, args.dtype)
    else:
        model, tokenizer, name = load_model(args.model, device=args.device, dtype=args.dtype)
    system = system_prompt(tokenizer, args.system_tokens)
    options = {"static_cache": True} if args.static else {}
    engines = {
        reuse: TransformersEngine(
            model,
            tokenizer,
            model.device,
            name=name,
            max_batch_size=16,
            prefix_cache=reuse,
            context_len=args.context_len,
            **options,
        )
        for reuse in (True, False)
    }
    results = asyncio.run(measure(engines, args, system))

    path = "static slot cache" if engines[True].static else "growing cache"
    print(f"# {name} on {args.device}, {path} ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs,"
          f" torch {torch.__version__}, {torch.get_num_threads()} threads)")  # fmt: skip
    print(f"\n## {args.turns}-turn conversation (best of {args.repeat}), time to first token")
    print("| turn | prompt tokens | new tokens | reused (on) | hit rate | TTFT on (ms) | TTFT off (ms) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    on, off = results[True]["turns"], results[False]["turns"]
    for t in range(args.turns):
        reusable = on[t]["prompt"] - on[t]["new"]
        rate = f"{on[t]['reused'] / reusable:.1%}" if reusable > 0 else "-"
        print(
            f"| {t + 1} | {on[t]['prompt']:.0f} | {on[t]['new']:.0f} | {on[t]['reused']:.0f} | {rate} "
            f"| {on[t]['ttft'] * 1000:.0f} | {off[t]['ttft'] * 1000:.0f} |"
        )
    last = args.turns - 1
    print(
        f"\nturn {args.turns} / turn 1 TTFT: reuse on {on[last]['ttft'] / on[0]['ttft']:.2f}x, "
        f"off {off[last]['ttft'] / off[0]['ttft']:.2f}x"
    )
    reusable = sum(on[t]["prompt"] - on[t]["new"] for t in range(1, args.turns))
    print(f"hit rate (reused / (prompt - new tokens), turns 2-{args.turns}): "
          f"{sum(on[t]['reused'] for t in range(1, args.turns)) / max(reusable, 1):.1%}")  # fmt: skip
    n = args.conversations
    print(f"\n## {n} concurrent conversations x 2 turns, shared {args.system_tokens}-token system prompt")
    print("| reuse | prompt tokens / request | prefilled / request | reused / request | tokens/s | TTFT p50 (ms) |")
    print("|---|---:|---:|---:|---:|---:|")
    for reuse in (True, False):
        s = results[reuse]["shared"]
        print(
            f"| {'on' if reuse else 'off'} | {s['prompt']:.0f} | {s['prefill']:.0f} | {s['reused']:.0f} "
            f"| {s['tokens_per_s']:.1f} | {s['ttft_p50'] * 1000:.0f} |"
        )


if __name__ == "__main__":
    main()
