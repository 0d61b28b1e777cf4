"""``ChatStream``'s settings, in five small groups and a few top-level values.

:class:`ChatStreamConfig` holds plain values (numbers, names, flags); the objects a ``ChatStream`` is
given (the engine, callbacks, a session store, a metrics registry) stay arguments of its own. Every
setting also has a flat keyword name, the original library's where it had one
(``num_of_concurrent_executions``, ``max_queue_size``, ``too_many_request_as_http_error``,
``max_new_tokens``, ``temperature``, ...): ``ChatStream(engine, max_queue_size=16)`` is
``ChatStream(engine, ChatStreamConfig(limits=Limits(max_queue_size=16)))``. The fair-admission group,
:class:`~chatstream_asgi.service.tenants.Fairness`, lives beside its logic; its ``tenant`` may be a
callable of the scope.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from chatstream_asgi.logs import DEFAULT_REQUEST_ID_HEADER
from chatstream_asgi.protocols.framing import FORMATS
from chatstream_asgi.service.tenants import Fairness

__all__ = ["ChatStreamConfig", "Limits", "Sampling", "SessionOptions", "Timeouts"]


@dataclass(frozen=True)
class Limits:
    """How much is admitted: replies at once, the queue, and the sizes of what a request may bring."""

    num_of_concurrent_executions: int = 2
    """Replies generated at once (slots)."""
    max_queue_size: int = 5
    """Requests waiting for a slot (FIFO); beyond them a request is answered ``too_many_requests`` at once."""
    too_many_request_as_http_error: bool = True
    """Queue full: 429 (the default here), or 200 as in the original library."""
    max_new_tokens: int = 256
    """The default and the ceiling of a reply's length (a request may ask for fewer)."""
    max_body_size: int = 1 << 20
    """Bytes of request body read in endpoint mode (the middleware has its own limit)."""
    max_history_messages: int = 200
    """Messages kept per session; the oldest turns go first."""


@dataclass(frozen=True)
class Sampling:
    """The default sampling of every reply; ``None`` takes the engine's ``default_generation_params``
    (the model's own) where it has a value, else :class:`~chatstream_asgi.GenerationParams`' default."""

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    penalize_prompt_tokens: bool | None = None
    """Whether the prompt's tokens count for the repetition penalty, or only the reply's."""


@dataclass(frozen=True)
class Timeouts:
    """Seconds."""

    send_timeout: float = 30.0
    """A send blocked this long (a client that stopped reading) ends the reply as a disconnect."""
    request_timeout: float | None = None
    """A deadline on each reply, queue wait included (off by default): past it, ``deadline_exceeded``."""
    shutdown_timeout: float = 10.0
    """How long open replies may finish when the service shuts down, before they are ended."""
    keepalive_interval: float = 15.0
    """While a request waits in the queue, its queue event is repeated this often (for proxies)."""


@dataclass(frozen=True)
class SessionOptions:
    """The session cookie: ``session_secret`` signs its token (the same on every replica; without it a
    random per-process secret is used and a warning logged)."""

    session_secret: str | bytes | None = field(default=None, repr=False)
    session_cookie: str = "chatstream_session"
    session_cookie_secure: bool = False


_GROUPS = {
    "limits": Limits,
    "sampling": Sampling,
    "timeouts": Timeouts,
    "sessions": SessionOptions,
    "fairness": Fairness,
}


@dataclass(frozen=True)
class ChatStreamConfig:
    """Every plain setting of a ``ChatStream`` (see the module docstring for the flat names)."""

    limits: Limits = field(default_factory=Limits)
    sampling: Sampling = field(default_factory=Sampling)
    timeouts: Timeouts = field(default_factory=Timeouts)
    sessions: SessionOptions = field(default_factory=SessionOptions)
    fairness: Fairness = field(default_factory=Fairness)
    """Tenants, their caps and priorities (``docs/fairness.md``)."""
    stream_format: str = "text"
    """The ``/chat_stream`` framing when a request names none: text, chatstream, sse or ndjson."""
    system_prompt: str | None = None
    """A system message put before every conversation that brings none."""
    request_id_header: str = DEFAULT_REQUEST_ID_HEADER
    """Where a request's id comes from (when well-formed) and goes back."""
    echo_request_id: bool = True
    """False leaves the id header out of replies, for a proxy in front that sets it (Ray Serve's does)."""

    def __post_init__(self) -> None:
        if self.stream_format not in FORMATS:
            raise ValueError(f"stream_format must be one of {sorted(FORMATS)}")
        timeout = self.timeouts.request_timeout
        if timeout is not None and timeout <= 0:
            raise ValueError("request_timeout must be positive (or None for no deadline)")

    def with_options(self, **options: Any) -> ChatStreamConfig:
        """This config with settings changed by their flat names; an unknown name is a :class:`TypeError`."""
        groups: dict[str, dict[str, Any]] = {name: {} for name in _GROUPS}
        top: dict[str, Any] = {}
        for name, value in options.items():
            group = _GROUP_OF.get(name)
            if group is None:
                raise TypeError(f"ChatStream got an unexpected keyword argument {name!r}")
            (groups[group] if group else top)[name] = value
        changed = {name: replace(getattr(self, name), **values) for name, values in groups.items() if values}
        return replace(self, **changed, **top)

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        """Every flat name with its default value."""
        config = cls()
        return {
            name: getattr(getattr(config, group), name) if group else getattr(config, name)
            for name, group in _GROUP_OF.items()
        }


_GROUP_OF: dict[str, str] = {
    **{f.name: group for group, kind in _GROUPS.items() for f in fields(kind)},
    **{f.name: "" for f in fields(ChatStreamConfig) if f.name not in _GROUPS},
}
"""Flat name → its group (``""``: a top-level setting)."""
