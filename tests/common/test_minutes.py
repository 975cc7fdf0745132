"""The performance view's per-minute series: each process cuts time at the wall clock's minutes and
keeps an hour; the view adds every relay's minutes into one series, with the minutes nobody saw as 0."""

from __future__ import annotations

from typing import Any

import pytest

from services.common.minutes import KEEP, Minutes
from services.common.sketch import Sketch
from services.relay.pipeline.performance import _minutes


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0  # a minute boundary

    def __call__(self) -> float:
        return self.now


def test_minutes_follow_the_wall_clock_and_keep_an_hour() -> None:
    clock = FakeClock()
    minutes = Minutes(clock=clock)
    for _ in range(3):
        minutes.observe("latency", 0.1)
    minutes.add("fault.provider")
    clock.now += 59.9
    minutes.observe("latency", 0.2)
    clock.now += 0.2  # the next minute
    minutes.observe("latency", 0.3)
    shown = minutes.snapshot()
    assert [m["minute_ms"] for m in shown] == [1_800_000_000_000, 1_800_000_060_000]
    assert Sketch.from_wire(shown[0]["sketches"]["latency"]).count == 4
    assert shown[0]["counters"] == {"fault.provider": 1.0}
    assert Sketch.from_wire(shown[1]["sketches"]["latency"]).count == 1
    # A clock stepping back records into the current minute.
    clock.now -= 120
    minutes.observe("latency", 0.3)
    assert Sketch.from_wire(minutes.snapshot()[1]["sketches"]["latency"]).count == 2
    clock.now += 120 + KEEP * 60
    assert minutes.snapshot() == []


def relay(minutes: Minutes) -> dict[str, Any]:
    return {"service": "relay", "minutes": minutes.snapshot()}


def test_the_view_adds_every_relays_minutes() -> None:
    clock = FakeClock()
    a, b = Minutes(clock=clock), Minutes(clock=clock)
    for _ in range(1000):
        a.observe("latency", 0.01)
    for _ in range(500):
        b.observe("latency", 1.0)
    b.add("fault.gateway", 2)
    clock.now += 61
    a.observe("latency", 0.01)
    series = _minutes([relay(a), relay(b)], int(clock.now * 1000))
    assert len(series) == KEEP
    assert [p["at_ms"] for p in series[-2:]] == [1_800_000_000_000, 1_800_000_060_000]
    first, last = series[-2:]
    assert first["requests"] == 1500
    assert first["errors"] == {
        "count": 2,
        "by_fault": {"caller": 0, "policy": 0, "provider": 0, "gateway": 2},
    }
    # Posted coarse (services.common.minutes.COARSE): within about 4 %.
    assert first["latency_ms"]["p50"] == pytest.approx(10.0, rel=0.05)
    assert first["latency_ms"]["p99"] == pytest.approx(1000.0, rel=0.05)
    assert last["requests"] == 1
    assert all(p["requests"] == 0 for p in series[:-2])
