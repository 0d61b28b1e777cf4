"""A started service freezes the start-up heap out of the collector's full passes; the last one to stop thaws it.

Run in a fresh interpreter: freezing is process-wide, and other tests' services may still be running here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import asyncio, contextlib, gc, json
from chatstream_asgi import ChatStream, MockEngine

class FailsToStop(MockEngine):
    async def shutdown(self):
        raise RuntimeError("the engine failed to stop")

class SlowToStart(MockEngine):
    def __init__(self):
        super().__init__()
        self.entered, self.go = asyncio.Event(), asyncio.Event()

    async def start(self):
        self.entered.set()
        await self.go.wait()

async def main():
    model = [[i] for i in range(200_000)]  # a loaded model's long-lived objects
    first, second = ChatStream(use_mock_response=True), ChatStream(FailsToStop(), session_secret="s")
    await first.start()
    await second.start()
    running = {"frozen": gc.get_freeze_count(), "full_pass_walks": len(gc.get_objects(generation=2))}
    await first.shutdown(0)
    one_left = gc.get_freeze_count()
    with contextlib.suppress(RuntimeError):
        await second.shutdown(0)
    gc.collect()
    stopped = {"stopped": gc.get_freeze_count(), "stopped_walks": len(gc.get_objects(generation=2))}
    late = ChatStream(SlowToStart(), session_secret="s")  # stopped while its engine starts: never frozen
    starting = asyncio.create_task(late.start())
    await late.engine.entered.wait()
    await late.shutdown(0)
    late.engine.go.set()
    await starting
    print(json.dumps({**running, "one_left": one_left, **stopped, "late": gc.get_freeze_count(),
                      "model": len(model)}))

asyncio.run(main())
"""


def test_the_start_up_heap_is_frozen_while_a_service_runs() -> None:
    root = Path(__file__).parents[2]
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["frozen"] > 200_000, seen  # the model's objects are out of full passes while serving
    assert seen["full_pass_walks"] < 20_000, seen
    assert seen["one_left"] == seen["frozen"], seen  # still frozen while the second service runs
    assert seen["stopped"] == 0 and seen["stopped_walks"] > 200_000, seen  # the last to stop thaws, even failing
    assert seen["late"] == 0, seen  # a service stopped before its engine had started freezes nothing
