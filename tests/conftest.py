"""Shared fixtures. Model fixtures live in model_fixtures.py; server helpers in servers.py."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "support"))

pytest_plugins = ["model_fixtures", "redis_server"]


@pytest.fixture
def anyio_backend() -> str:
    """The package runs on asyncio (the engine hands tokens over with ``call_soon_threadsafe``)."""
    return "asyncio"
