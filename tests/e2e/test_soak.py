"""The soak benchmark's short variant: 25 seconds of mixed load leave memory, tasks and sessions flat.

``benchmarks/soak.py`` pauses the load after its warm-up and at the end until the server is idle,
and compares the two idle samples. The bounds are generous (a loaded machine moves these numbers
a little; a leak of anything per request, over thousands of requests, moves them a lot).
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path

BENCHMARK = Path(__file__).parents[2] / "benchmarks" / "soak.py"
RSS_GROWTH = 32 << 20
TASK_GROWTH = 25
OBJECT_GROWTH = 5000
SESSION_GROWTH = 8


def test_short_soak_stays_flat() -> None:
    spec = importlib.util.spec_from_file_location("soak", BENCHMARK)
    assert spec is not None and spec.loader is not None
    soak = sys.modules["soak"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    result = asyncio.run(soak.soak(25.0, interval=2.5, clients=32))
    growth, counts = result["growth"], result["counts"]
    assert sum(counts.values()) >= 200, counts  # the load ran (about 3,000 on an idle 2-core machine)
    assert not any(key.endswith((":500", ":transport_error")) for key in counts), counts
    assert growth["rss"] <= RSS_GROWTH, (result["start"], result["end"])
    assert growth["tasks"] <= TASK_GROWTH, (result["start"], result["end"])
    assert growth["objects"] <= OBJECT_GROWTH, (result["start"], result["end"])
    assert growth["sessions"] <= SESSION_GROWTH, (result["start"], result["end"])
