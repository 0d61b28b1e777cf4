"""chatstream-asgi: turn any ASGI app into a load-controlled streaming LLM chat server."""

from .admission import Admission, QueueFull
from .chat_request import ChatRequest, InvalidRequest
from .chatstream import Callback, ChatResult, ChatStream, ChatStreamResponse, get_result
from .engine import (
    Engine,
    EngineError,
    GenerationParams,
    GenerationRequest,
    GenerationStream,
    PromptTooLong,
    QueueStream,
)
from .engine_pool import EnginePool
from .formats import EOS_MARKER, ERROR_MARKER, FORMATS
from .middleware import ChatStreamMiddleware
from .mock import MockEngine, MockParams
from .redis_store import RedisSessionStore
from .remote_engine import EngineOverloaded, EngineUnavailable, OpenAIEngine
from .sessions import MemorySessionStore, Session, SessionStore
from .states import CompletionState

__version__ = "0.1.0"

__all__ = [
    "EOS_MARKER",
    "ERROR_MARKER",
    "FORMATS",
    "Admission",
    "Callback",
    "ChatRequest",
    "ChatResult",
    "ChatStream",
    "ChatStreamMiddleware",
    "ChatStreamResponse",
    "CompletionState",
    "Engine",
    "EngineError",
    "EngineOverloaded",
    "EnginePool",
    "EngineUnavailable",
    "GenerationParams",
    "GenerationRequest",
    "GenerationStream",
    "InvalidRequest",
    "MemorySessionStore",
    "MockEngine",
    "MockParams",
    "OpenAIEngine",
    "PromptTooLong",
    "QueueFull",
    "QueueStream",
    "RedisSessionStore",
    "Session",
    "SessionStore",
    "get_result",
]
