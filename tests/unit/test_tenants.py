"""Where a tenant and a priority come from, and the tenant metrics' bounded labels."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from chatstream_asgi.service.tenant_metrics import OTHER, TenantMetrics
from chatstream_asgi.service.tenants import ANONYMOUS_TENANT, Fairness, tenant_name


def scope(*headers: tuple[str, str], **extra: Any) -> dict[str, Any]:
    return {"type": "http", "headers": [(k.lower().encode(), v.encode()) for k, v in headers], **extra}


class User:
    is_authenticated = True

    def __init__(self, name: str) -> None:
        self.display_name = name

    @property
    def identity(self) -> str:
        raise NotImplementedError  # as Starlette's SimpleUser


def test_without_a_source_everyone_is_one_tenant() -> None:
    assert Fairness().tenant_of(scope(("X-API-Key", "k"))) == "default"


@pytest.mark.parametrize(
    ("source", "request_scope", "key"),
    [
        ("header:X-API-Key", scope(("X-API-Key", "sk-1")), "sk-1"),
        ("bearer", scope(("Authorization", "Bearer tok-9")), "tok-9"),
        ("user", scope(user=User("ann")), "ann"),
        ("user", scope(user="bob"), "bob"),
        ("state:org", scope(state={"org": "acme"}), "acme"),
        ("state:org", scope(state=SimpleNamespace(org="acme")), "acme"),
    ],
)
def test_each_source_names_the_tenant_by_a_hash_of_its_key(source: str, request_scope: dict, key: str) -> None:
    name = Fairness(tenant=source).tenant_of(request_scope)
    assert name == tenant_name(key) and key not in name and len(name) == 14


@pytest.mark.parametrize(
    ("source", "request_scope"),
    [
        ("header:X-API-Key", scope()),
        ("bearer", scope(("Authorization", "Basic abc"))),
        ("user", scope(user=SimpleNamespace(is_authenticated=False, display_name=""))),
        ("state:org", scope()),
        ("session", scope()),
    ],
)
def test_no_key_is_the_anonymous_tenant(source: str, request_scope: dict) -> None:
    assert Fairness(tenant=source).tenant_of(request_scope) == ANONYMOUS_TENANT


def test_session_callable_and_clear_names() -> None:
    assert Fairness(tenant="session").tenant_of(scope(), "sid") == tenant_name("sid")
    assert Fairness(tenant=lambda s: "org-7").tenant_of(scope()) == tenant_name("org-7")
    assert Fairness(tenant=lambda s: "org-7", hash_keys=False).tenant_of(scope()) == "org-7"
    header = Fairness(tenant="header:X-API-Key", hash_keys=False)  # credentials are hashed whatever it says
    assert header.tenant_of(scope(("X-API-Key", "sk-1"))) == tenant_name("sk-1")
    claim = Fairness(tenant="header:X-API-Key").claim(
        scope(("X-API-Key", "sk-1")), session_id=None, body_priority=0, prompt_tokens=1, max_new_tokens=8,
        source=lambda s: "mw",  # the middleware's own source
    )  # fmt: skip
    assert claim.tenant == tenant_name("mw")


def test_an_unknown_source_fails_at_configuration() -> None:
    with pytest.raises(ValueError, match="unknown tenant source"):
        Fairness(tenant="cookie:x")


def test_priority_from_the_header_or_the_body() -> None:
    fairness = Fairness(priority_header="X-Priority", priority_names={"batch": 5})
    assert fairness.priority_of(scope(("X-Priority", "batch")), -3) == 5
    assert fairness.priority_of(scope(("X-Priority", "-2")), 7) == -2
    assert fairness.priority_of(scope(("X-Priority", "9999")), 0) == 100  # clamped
    assert fairness.priority_of(scope(("X-Priority", "urgent!")), 7) == 7  # unknown: the body's
    assert fairness.priority_of(scope(), 3) == 3
    assert Fairness(body_priority=False).priority_of(scope(), 3) == 0


def test_metrics_name_the_busiest_tenants_and_count_the_rest_as_other() -> None:
    registry = CollectorRegistry()
    metrics = TenantMetrics(registry, named=2, load=lambda t: (1, 0), totals=lambda: (5, 3))
    for _ in range(3):
        metrics.admitted("t-a")
    metrics.admitted("t-b")
    for i in range(50):  # many one-off tenants: all under "other"
        metrics.admitted(f"t-x{i}")
        metrics.finished(f"t-x{i}", 10, 5)
    text = generate_latest(registry).decode()
    assert 'chatstream_tenant_admitted_total{tenant="t-a"} 3.0' in text
    assert 'chatstream_tenant_admitted_total{tenant="t-b"} 1.0' in text
    assert f'chatstream_tenant_admitted_total{{tenant="{OTHER}"}} 50.0' in text
    assert f'chatstream_tenant_tokens_total{{kind="generated",tenant="{OTHER}"}} 250.0' in text
    assert f'chatstream_tenant_active{{tenant="{OTHER}"}} 3.0' in text  # 5 in all, 1 each for t-a and t-b
    assert len({line.split("{")[1].split("}")[0] for line in text.splitlines() if "admitted_total{" in line}) == 3
    for _ in range(10):  # a newcomer twice as busy as the weakest named tenant takes its place
        metrics.admitted("t-new")
    text = generate_latest(registry).decode()
    assert 'chatstream_tenant_admitted_total{tenant="t-b"}' not in text
    assert 'tenant="t-new"' in text
    assert f'chatstream_tenant_admitted_total{{tenant="{OTHER}"}} 53.0' in text  # t-b's 1, t-new's first 2


def test_a_tenant_named_other_is_counted_in_other_not_exported_twice() -> None:
    """With ``hash_keys=False`` a user may be called ``other``: its series must not repeat ``tenant="other"``."""
    registry = CollectorRegistry()
    metrics = TenantMetrics(registry, named=5, load=lambda t: (1, 0), totals=lambda: (2, 0))
    metrics.admitted(OTHER)
    metrics.admitted("alice")
    text = generate_latest(registry).decode()
    lines = [line for line in text.splitlines() if line.startswith("chatstream_tenant_active{")]
    assert sorted(lines) == [
        'chatstream_tenant_active{tenant="alice"} 1.0',
        'chatstream_tenant_active{tenant="other"} 1.0',
    ]
    assert f'chatstream_tenant_admitted_total{{tenant="{OTHER}"}} 1.0' in text
