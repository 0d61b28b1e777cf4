"""A started service freezes the start-up heap out of the collector's full passes; the last one to stop thaws it.

Run in a fresh interpreter: freezing is process-wide, and other tests' services may still be running here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import asyncio, gc, json
from chatstream_asgi import ChatStream

async def main():
    model = [[i] for i in range(200_000)]  # a loaded model's long-lived objects
    first, second = ChatStream(use_mock_response=True), ChatStream(use_mock_response=True)
    await first.start()
    await second.start()
    running = {"frozen": gc.get_freeze_count(), "full_pass_walks": len(gc.get_objects(generation=2))}
    await first.shutdown(0)
    one_left = gc.get_freeze_count()
    await second.shutdown(0)
    gc.collect()
    print(json.dumps({**running, "one_left": one_left, "stopped": gc.get_freeze_count(),
                      "stopped_walks": len(gc.get_objects(generation=2)), "model": len(model)}))

asyncio.run(main())
"""


def test_the_start_up_heap_is_frozen_while_a_service_runs() -> None:
    root = Path(__file__).parent.parent
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["frozen"] > 200_000, seen  # the model's objects are out of full passes while serving
    assert seen["full_pass_walks"] < 20_000, seen
    assert seen["one_left"] == seen["frozen"], seen  # still frozen while the second service runs
    assert seen["stopped"] == 0 and seen["stopped_walks"] > 200_000, seen  # the last one to stop thaws
