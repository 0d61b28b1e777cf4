"""Whose request is this, and how urgent: the tenant and priority that admission shares slots by.

A tenant key comes from one configured source (``Fairness.tenant``):

================  =====================================================================================
``None``          one tenant, ``default`` (the behaviour without tenants: one fair = FIFO queue)
``"header:NAME"`` the request header ``NAME`` (``X-API-Key``, say)
``"bearer"``      the token of ``Authorization: Bearer <token>``
``"user"``        ``scope["user"]`` as an auth middleware leaves it (Starlette's ``AuthenticationMiddleware``:
                  its ``identity``, else ``display_name``; unauthenticated users have none)
``"state:KEY"``   ``scope["state"][KEY]`` (``request.state.KEY``), set by your own middleware
``"session"``     the chat session (``/chat_stream`` with ``user_input``; a client without a session
                  token gets a fresh session, so this limits conversations, not clients)
a callable        ``tenant(scope) -> str | None``
================  =====================================================================================

A request whose source yields nothing belongs to the tenant ``anonymous``. Keys are never kept,
logged or exported in clear: a tenant is named ``t-`` + 12 hex digits of the key's SHA-256
(``hash_keys=False`` keeps the names of ``user``, ``state`` and callable sources as they are, for
identities that are not secrets; header and bearer keys are always hashed).

A priority (lower is served first, as vLLM's ``priority``; within a tenant's own requests only) comes
from the ``priority_header`` when configured (an integer, clamped to +-``MAX_PRIORITY``, or a name in
``priority_names``), else from the body's ``priority`` field when ``body_priority`` is on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from chatstream_asgi.protocols.chat import MAX_PRIORITY
from chatstream_asgi.service.admission import DEFAULT_TENANT, Claim
from chatstream_asgi.types import Scope

__all__ = ["ANONYMOUS_TENANT", "Fairness", "TenantSource", "tenant_name"]

TenantSource = str | Callable[[Scope], "str | None"]
ANONYMOUS_TENANT = "anonymous"


def tenant_name(key: str) -> str:
    """The name a tenant key is known by in logs, metrics and ``/get_load``: never the key itself."""
    return "t-" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:12]


@dataclass(frozen=True)
class Fairness:
    """How generation slots are shared between tenants (``ChatStream(fairness=...)``).

    ``tenant`` is the key's source (see the module); ``tenant_max_active`` and ``tenant_max_queued``
    cap each tenant's replies at once and queue places (None: only the global limits);
    ``priority_step`` is the seconds of arrival one step of priority is worth; ``metrics_tenants`` is
    how many of the busiest tenants the ``chatstream_tenant_*`` metrics name (the rest are ``other``).
    """

    tenant: TenantSource | None = None
    tenant_max_active: int | None = None
    tenant_max_queued: int | None = None
    priority_header: str | None = None
    priority_names: Mapping[str, int] = field(default_factory=dict)
    body_priority: bool = True
    priority_step: float = 60.0
    hash_keys: bool = True
    metrics_tenants: int = 20

    def __post_init__(self) -> None:
        if isinstance(self.tenant, str):
            _reader(self.tenant)  # an unknown source fails here, not on the first request
        if self.metrics_tenants < 0:
            raise ValueError("metrics_tenants must not be negative")

    @property
    def tenants_on(self) -> bool:
        """Whether requests are told apart by tenant."""
        return self.tenant is not None

    def tenant_of(self, scope: Scope | None, session_id: str | None = None, source: TenantSource | None = None) -> str:
        """The tenant name of a request (``source`` overrides the configured one); no scope: nobody's."""
        source = source if source is not None else self.tenant
        if source is None:
            return DEFAULT_TENANT
        if scope is None:
            return ANONYMOUS_TENANT
        if callable(source):
            key, secret = source(scope), False
        else:
            read, secret = _reader(source)
            key = session_id if read is None else read(scope)
        if key is None or key == "":
            return ANONYMOUS_TENANT
        key = str(key)
        return tenant_name(key) if secret or self.hash_keys else key

    def priority_of(self, scope: Scope, body_priority: int = 0) -> int:
        """The request's priority: the header's when configured and present, else the body's."""
        if self.priority_header is not None:
            value = _header(scope, self.priority_header)
            if value is not None:
                value = value.strip()
                named = self.priority_names.get(value.lower())
                if named is not None:
                    return max(-MAX_PRIORITY, min(MAX_PRIORITY, named))
                try:
                    return max(-MAX_PRIORITY, min(MAX_PRIORITY, int(value)))
                except ValueError:
                    pass  # an unknown value counts as no header
        return body_priority if self.body_priority else 0

    def claim(
        self,
        scope: Scope | None,
        *,
        session_id: str | None,
        body_priority: int,
        prompt_tokens: int,
        max_new_tokens: int,
        source: TenantSource | None = None,
    ) -> Claim:
        """What admission needs to know of one request (``source`` overrides the configured tenant source)."""
        return Claim(
            tenant=self.tenant_of(scope, session_id, source),
            priority=body_priority if scope is None else self.priority_of(scope, body_priority),
            prompt_tokens=prompt_tokens,
            max_new_tokens=max_new_tokens,
        )


Reader = Callable[[Scope], Any]


def _reader(source: str) -> tuple[Reader | None, bool]:
    """How to read a string source, and whether its key is a secret (always hashed). None: the session."""
    kind, _, name = source.partition(":")
    if kind == "header" and name:
        return (lambda scope: _header(scope, name)), True
    if kind == "bearer" and not name:
        return _bearer, True
    if kind == "user" and not name:
        return _user, False
    if kind == "state" and name:
        return (lambda scope: _state(scope, name)), False
    if kind == "session" and not name:
        return None, False
    raise ValueError(f"unknown tenant source {source!r}: header:NAME, bearer, user, state:KEY, session or a callable")


def _header(scope: Scope, name: str) -> str | None:
    wanted = name.lower().encode("latin-1")
    for key, value in scope.get("headers", ()):
        if key == wanted:
            return bytes(value).decode("latin-1")
    return None


def _bearer(scope: Scope) -> str | None:
    value = _header(scope, "authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def _user(scope: Scope) -> Any:
    user = scope.get("user")
    if user is None or isinstance(user, str):
        return user
    if not getattr(user, "is_authenticated", True):
        return None
    try:
        identity = user.identity
    except (AttributeError, NotImplementedError):
        identity = None
    return identity if identity else getattr(user, "display_name", None)


def _state(scope: Scope, key: str) -> Any:
    state = scope.get("state")
    if state is None:
        return None
    return state.get(key) if isinstance(state, Mapping) else getattr(state, key, None)
