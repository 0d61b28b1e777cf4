"""The ``serve`` command's tenant and priority options (``docs/fairness.md``), and the settings they make."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Any

from chatstream_asgi.service.tenants import Fairness

__all__ = ["add_fairness_arguments", "fairness_options"]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be at least 0")
    return value


def add_fairness_arguments(parser: argparse.ArgumentParser) -> None:
    """``--tenant-header`` and the rest, in their own group."""
    group = parser.add_argument_group(
        "tenants and priorities",
        "Share the slots fairly between tenants: the next slot goes to the tenant served the fewest tokens.\n"
        "Without a tenant source every request is one tenant's (a FIFO queue).",
    )
    source = group.add_mutually_exclusive_group()
    source.add_argument("--tenant-header", metavar="NAME", help="the tenant key is this header's value (X-API-Key)")
    source.add_argument(
        "--tenant-source",
        metavar="SOURCE",
        help="or: bearer (the Authorization bearer token), user (scope['user']), state:KEY, session",
    )
    group.add_argument("--tenant-max-active", type=_positive, metavar="N", help="replies at once per tenant")
    group.add_argument("--tenant-max-queued", type=_count, metavar="N", help="queue places per tenant")
    group.add_argument(
        "--priority-header", metavar="NAME", help="a request's priority (an integer, lower first) from this header"
    )
    group.add_argument(
        "--no-body-priority",
        dest="body_priority",
        action="store_false",
        help="ignore the body's priority field (it orders a tenant's own requests only)",
    )


def fairness_options(args: argparse.Namespace) -> dict[str, Any]:
    """``ChatStream``'s fairness settings (flat names) the options ask for; a bad ``--tenant-source`` exits
    with its message."""
    source = f"header:{args.tenant_header}" if args.tenant_header else args.tenant_source
    try:
        return asdict(
            Fairness(
                tenant=source,
                tenant_max_active=args.tenant_max_active,
                tenant_max_queued=args.tenant_max_queued,
                priority_header=args.priority_header,
                body_priority=args.body_priority,
            )
        )
    except ValueError as exc:
        raise SystemExit(f"error: --tenant-source: {exc}") from None
