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
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from chatstream_asgi.cli.fairness import fairness_options
from chatstream_asgi.cli.options import build_parser
from chatstream_asgi.engines.base import Engine
from chatstream_asgi.engines.mock import MockEngine, MockParams
from chatstream_asgi.engines.pool import EnginePool
from chatstream_asgi.engines.remote import OpenAIEngine
from chatstream_asgi.server.chatstream import ChatStream
from chatstream_asgi.sessions.store import SessionStore

__all__ = ["build_parser", "main"]

logger = logging.getLogger("chatstream_asgi.cli")


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
    devices = _devices(args)
    _without_triton_on_cpu(devices)
    try:
        from chatstream_asgi.engines.transformers.engine import TransformersEngine
        from chatstream_asgi.engines.transformers.loading import ModelLoadError, resolve_model
    except ImportError as exc:
        raise SystemExit(f"error: {exc}") from None
    logger.info("imported torch and transformers (%.1f s)", time.perf_counter() - started)
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


def _without_triton_on_cpu(devices: list[str | None]) -> None:
    """Keep triton, a GPU kernel compiler, out of a server whose engines all run on the CPU.

    transformers imports ``torch._dynamo``, which imports triton to see whether it is there: 66 MiB resident
    (its library) that a CPU server never uses. With ``sys.modules["triton"]`` None the import fails, and
    PyTorch proceeds as on a machine without triton (``torch.compile`` on the CPU does not need it).
    """
    try:
        import torch
    except ImportError:  # the engine's import says which extra to install
        return
    if all(torch.device(d or ("cuda" if torch.cuda.is_available() else "cpu")).type == "cpu" for d in devices):
        sys.modules.setdefault("triton", None)


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
    """Entry point; ``prog`` is how the command was invoked (default: the script's name), for usage lines.

    Called on the main thread, it owns SIGINT (and, while serving, SIGTERM): once the server has stopped,
    SIGINT stays ignored, since the process is about to exit."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if getattr(args, "max_prefill_tokens", 0) < 0:
        parser.error("--max-prefill-tokens must be 0 (no cap) or more")
    started = time.perf_counter()
    # SIGINT stops the server at every stage, as it does once serving: a shell that starts the command in
    # the background leaves SIGINT ignored, and the load would inherit that and never see a Ctrl+C. Only
    # the main thread may set handlers: called from another one, signals stay as the process has them.
    if _on_main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
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
        _exit_now(130)
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
        **fairness_options(args),
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
    if _on_main_thread():  # stopped: a Ctrl+C pressed again while the interpreter finalizes (torch's exit
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # hooks) would end it with a KeyboardInterrupt traceback


def _exit_now(status: int) -> None:
    """End the process at once, skipping the interpreter's finalization.

    Ctrl+C while the model loads leaves the loading thread inside torch's C++ code (an OpenMP region, a
    weight-packing kernel); finalizing the interpreter around it aborted the process ("terminate called
    without an active exception", SIGABRT) or hung it. Nothing needs cleaning up yet: no server runs, and
    the bound socket closes with the process.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _log_sampling(chat_stream: ChatStream, engine: Engine) -> None:
    params = chat_stream.default_params
    source = "the model's recommended" if engine.default_generation_params else "the defaults"
    how = "greedy, " if params.temperature == 0 else ""
    over = "" if params.penalize_prompt_tokens or params.repetition_penalty == 1 else " over the reply"
    logger.info(
        "sampling: %stemperature %g, top-p %g, top-k %d, repetition penalty %g%s (%s where unset by flags)",
        how, params.temperature, params.top_p, params.top_k, params.repetition_penalty, over, source,
    )  # fmt: skip


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


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

    if _on_main_thread():  # elsewhere the server runs until the process ends
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)

    async def shutdown_trigger() -> None:
        await stop.wait()
        log.info(
            "shutting down: draining open replies (up to %g s; Ctrl+C again to stop now)",
            chat_stream.config.timeouts.shutdown_timeout,
        )
        await chat_stream.shutdown()

    await serve(app, config, shutdown_trigger=shutdown_trigger)
