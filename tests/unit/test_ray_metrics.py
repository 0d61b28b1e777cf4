"""A replica's metrics mirrored into Ray Serve's (``RayMetrics``), without Ray processes: every sample of the
ChatStream's registry becomes a gauge of the same name and labels, set to the sample's value."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("ray.serve")

import ray.serve.metrics

from chatstream_asgi import ChatStream, MockEngine
from chatstream_asgi.integrations.ray_serve import RayMetrics

pytestmark = pytest.mark.ray


class Gauge:
    """Ray's gauge as the mirror uses it: made once per name and tag keys, then set."""

    made: list[tuple[str, tuple[str, ...]]] = []
    values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def __init__(self, name: str, description: str = "", tag_keys: tuple[str, ...] = ()) -> None:
        self.name = name
        Gauge.made.append((name, tag_keys))

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        Gauge.values[self.name, tuple(sorted((tags or {}).items()))] = value


def test_every_sample_becomes_a_gauge_made_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray.serve.metrics, "Gauge", Gauge)
    cs = ChatStream(MockEngine(), session_secret="s")
    mirror = RayMetrics(cs.metrics.registry)
    mirror.mirror()
    cs.metrics.completions.labels(state="success").inc(3)
    mirror.mirror()
    values: dict[Any, float] = Gauge.values
    assert values["chatstream_completions_total", (("state", "success"),)] == 3.0
    assert values["chatstream_queue_depth", ()] == 0.0
    assert ("chatstream_time_to_first_token_seconds_bucket", ("le",)) in Gauge.made
    assert len(Gauge.made) == len(set(Gauge.made))  # the second mirror made no new gauge
    assert not any(name.endswith("_created") for name, _ in Gauge.made)
