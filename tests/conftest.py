"""Shared fixtures. Model fixtures live in model_fixtures.py; server helpers in servers.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

pytest_plugins = ["model_fixtures"]
