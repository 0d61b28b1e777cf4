"""chatstream-asgi: turn any ASGI app into a load-controlled streaming LLM chat server."""

from chatstream_asgi.engines.base import (
    Engine,
    EngineError,
    GenerationParams,
    GenerationRequest,
    GenerationStream,
    MemberStatus,
    PromptTooLong,
    QueueStream,
    RemoteLoad,
    TokenLogprob,
    UnsupportedFeature,
)
from chatstream_asgi.engines.mock import MockEngine, MockParams
from chatstream_asgi.engines.pool import EnginePool
from chatstream_asgi.engines.remote import EngineOverloaded, EngineRefused, EngineUnavailable, OpenAIEngine
from chatstream_asgi.protocols.chat import ChatRequest, InvalidRequest
from chatstream_asgi.protocols.framing import EOS_MARKER, ERROR_MARKER, FORMATS
from chatstream_asgi.server.chatstream import ChatStream, ChatStreamResponse
from chatstream_asgi.server.middleware import ChatStreamMiddleware
from chatstream_asgi.service.admission import Admission, QueueFull
from chatstream_asgi.service.config import ChatStreamConfig, Limits, Sampling, SessionOptions, Timeouts
from chatstream_asgi.service.exchange import ChatResult, get_result
from chatstream_asgi.service.tenants import Fairness
from chatstream_asgi.sessions.redis_store import RedisSessionStore
from chatstream_asgi.sessions.store import MemorySessionStore, Session, SessionStore
from chatstream_asgi.states import CompletionState
from chatstream_asgi.types import Callback
from chatstream_asgi.web.app import create_app

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # TransformersEngine imports torch: load it on first use so that `import chatstream_asgi` stays light.
    if name == "TransformersEngine":
        from chatstream_asgi.engines.transformers import TransformersEngine

        return TransformersEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "EOS_MARKER",
    "ERROR_MARKER",
    "FORMATS",
    "Admission",
    "Callback",
    "ChatRequest",
    "ChatResult",
    "ChatStream",
    "ChatStreamConfig",
    "ChatStreamMiddleware",
    "ChatStreamResponse",
    "CompletionState",
    "Engine",
    "EngineError",
    "EngineOverloaded",
    "EnginePool",
    "EngineRefused",
    "EngineUnavailable",
    "Fairness",
    "GenerationParams",
    "GenerationRequest",
    "GenerationStream",
    "InvalidRequest",
    "Limits",
    "MemberStatus",
    "MemorySessionStore",
    "MockEngine",
    "MockParams",
    "OpenAIEngine",
    "PromptTooLong",
    "QueueFull",
    "QueueStream",
    "RedisSessionStore",
    "RemoteLoad",
    "Sampling",
    "Session",
    "SessionOptions",
    "SessionStore",
    "Timeouts",
    "TokenLogprob",
    "TransformersEngine",
    "UnsupportedFeature",
    "create_app",
    "get_result",
]
