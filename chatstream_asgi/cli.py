"""``python -m chatstream_asgi serve``: a ready chat server under hypercorn."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from collections.abc import Sequence
from typing import Any

from chatstream_asgi.engines.base import Engine
from chatstream_asgi.engines.mock import MockEngine, MockParams
from chatstream_asgi.engines.pool import EnginePool
from chatstream_asgi.engines.remote import OpenAIEngine
from chatstream_asgi.protocols.framing import FORMATS
from chatstream_asgi.service.chatstream import ChatStream

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = argparse.ArgumentParser(prog="python -m chatstream_asgi", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve a chat model over HTTP")
    serve.add_argument("--engine", choices=["transformers", "mock", "openai"], default="transformers")
    serve.add_argument("--model", default="smollm2", help="'smollm2' (default), a local directory or a hub id")
    serve.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)")
    serve.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: per device)")
    gpu = serve.add_argument_group("transformers engine on CUDA (static KV cache)")
    gpu.add_argument("--no-cuda-graphs", action="store_true", help="run the decode step eagerly (debugging)")
    gpu.add_argument("--kv-cache-memory", type=float, metavar="GIB", help="KV cache budget in GiB")
    gpu.add_argument("--gpu-memory-utilization", type=float, metavar="FRACTION", help="or: share of the card")
    gpu.add_argument("--max-prefill-tokens", type=int, metavar="N", help="prompt tokens per chunk between steps")
    reuse = serve.add_argument_group("transformers engine: prefix reuse (KV kept between turns)")
    reuse.add_argument("--no-prefix-cache", action="store_true", help="prefill every prompt in full")
    reuse.add_argument("--prefix-cache-memory", type=float, default=1.0, metavar="GIB", help="KV kept for reuse")
    serve.add_argument(
        "--remote-url",
        action="append",
        default=[],
        metavar="URL",
        help="with --engine openai: an OpenAI-compatible server (repeat for a least-loaded pool)",
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--concurrency", type=int, default=4, help="replies generated at once")
    serve.add_argument("--queue", type=int, default=16, help="requests allowed to wait")
    serve.add_argument("--max-new-tokens", type=int, default=256)
    serve.add_argument("--stream-format", choices=sorted(FORMATS), default="text")
    serve.add_argument("--system-prompt", default=None)
    serve.add_argument(
        "--session-secret",
        default=os.environ.get("CHATSTREAM_SESSION_SECRET"),
        help="signs session tokens (default: $CHATSTREAM_SESSION_SECRET, else random per process)",
    )
    serve.add_argument("--mock-type", choices=["round", "long", "echo"], default="round")
    serve.add_argument("--mock-initial-wait", type=float, default=0.0, metavar="SEC")
    serve.add_argument("--mock-time-per-token", type=float, default=0.05, metavar="SEC")
    serve.add_argument(
        "--shutdown-timeout",
        type=float,
        default=10.0,
        metavar="SEC",
        help="on SIGINT/SIGTERM, how long open replies may finish before they are aborted",
    )
    serve.add_argument("--log-level", default="info")
    return parser


def _engine(args: argparse.Namespace) -> Engine:
    if args.engine == "mock":
        return MockEngine(MockParams(args.mock_type, args.mock_initial_wait, args.mock_time_per_token))
    if args.engine == "openai":
        if not args.remote_url:
            raise SystemExit("--engine openai needs at least one --remote-url")
        model = None if args.model == "smollm2" else args.model
        engines = [OpenAIEngine(url, model) for url in args.remote_url]
        return engines[0] if len(engines) == 1 else EnginePool(engines)
    from chatstream_asgi.engines.transformers.engine import TransformersEngine

    return TransformersEngine.from_pretrained(
        args.model,
        device=args.device,
        dtype=args.dtype,
        max_batch_size=args.concurrency,
        cuda_graphs=not args.no_cuda_graphs,
        kv_cache_memory=args.kv_cache_memory,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_prefill_tokens=args.max_prefill_tokens,
        prefix_cache=not args.no_prefix_cache,
        prefix_cache_memory=args.prefix_cache_memory,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        from hypercorn.asyncio import serve
        from hypercorn.config import Config
    except ImportError:  # pragma: no cover - depends on the install
        raise SystemExit("the server needs hypercorn: pip install 'chatstream-asgi[server]'") from None
    from chatstream_asgi.web.app import create_app

    chat_stream = ChatStream(
        _engine(args),
        num_of_concurrent_executions=args.concurrency,
        max_queue_size=args.queue,
        max_new_tokens=args.max_new_tokens,
        stream_format=args.stream_format,
        system_prompt=args.system_prompt,
        session_secret=args.session_secret,
        shutdown_timeout=args.shutdown_timeout,
    )
    config = Config()
    config.bind = [f"{args.host}:{args.port}"]
    config.loglevel = args.log_level.upper()
    config.graceful_timeout = 5.0
    asyncio.run(_serve(serve, create_app(chat_stream), config, chat_stream))


async def _serve(serve: Any, app: Any, config: Any, chat_stream: ChatStream) -> None:
    """Run hypercorn; on SIGINT/SIGTERM drain the chat service *before* hypercorn shuts down.

    Servers close open connections before they send the lifespan shutdown, so the lifespan hook
    alone would come too late: streams would be cut (and reported as client disconnects). Here
    admission stops, open replies get ``--shutdown-timeout`` to finish and the rest end with an
    error frame, then hypercorn stops.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async def shutdown_trigger() -> None:
        await stop.wait()
        logging.getLogger("chatstream_asgi").info("shutting down: draining open replies")
        await chat_stream.shutdown()

    await serve(app, config, shutdown_trigger=shutdown_trigger)
