"""The performance view's building blocks: the log-bucket sketch keeps its error bound and merges, and
the rolling windows forget what left them."""

from __future__ import annotations

import random

import pytest

from services.common.rolling import Rolling
from services.common.sketch import RELATIVE_ERROR, Sketch


def exact(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_quantiles_are_within_the_relative_error(seed: int) -> None:
    rng = random.Random(seed)
    # Latencies over six orders of magnitude, long tailed.
    values = [rng.lognormvariate(-4, 2) for _ in range(20_000)]
    sketch = Sketch()
    for value in values:
        sketch.add(value)
    for q in (0.5, 0.9, 0.95, 0.99, 0.999):
        assert sketch.quantile(q) == pytest.approx(exact(values, q), rel=RELATIVE_ERROR * 1.0001)
    qs = (0.0, 0.5, 0.95, 0.99, 1.0)
    for q, found in zip(qs, sketch.quantiles(qs), strict=True):
        assert found == pytest.approx(exact(values, q), rel=RELATIVE_ERROR * 1.0001)


def test_sketches_merge_as_if_one_and_subtract_back() -> None:
    rng = random.Random(7)
    a_values = [rng.uniform(0.001, 0.1) for _ in range(5000)]
    b_values = [rng.uniform(0.05, 2.0) for _ in range(5000)]
    a, b, both = Sketch(), Sketch(), Sketch()
    for value in a_values:
        a.add(value)
        both.add(value)
    for value in b_values:
        b.add(value)
        both.add(value)
    merged = Sketch.from_wire(a.to_wire())
    merged.merge(Sketch.from_wire(b.to_wire()))
    assert merged.buckets == both.buckets and merged.count == 10_000
    merged.merge(b, sign=-1)
    assert merged.buckets == a.buckets and merged.count == a.count


def test_tiny_values_and_empty_sketches() -> None:
    sketch = Sketch()
    assert sketch.quantile(0.99) == 0.0
    sketch.add(0.0)
    sketch.add(1e-9)
    assert sketch.quantile(0.5) == 0.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_windows_forget_slots_that_left_them() -> None:
    clock = FakeClock()
    rolling = Rolling(clock=clock)
    for _ in range(10):
        rolling.add("requests")
        rolling.observe("latency", 0.1)
    clock.now += 65  # past the minute, inside five
    rolling.add("requests", 2)
    rolling.observe("latency", 1.0)
    shown = rolling.snapshot()
    assert shown["1m"]["counters"] == {"requests": 2.0}
    assert shown["5m"]["counters"] == {"requests": 12.0}
    assert shown["1h"]["counters"] == {"requests": 12.0}
    assert Sketch.from_wire(shown["1m"]["sketches"]["latency"]).count == 1
    assert Sketch.from_wire(shown["5m"]["sketches"]["latency"]).count == 11
    clock.now += 300
    shown = rolling.snapshot()
    assert shown["1m"]["counters"] == {} and shown["5m"]["counters"] == {}
    assert shown["1h"]["counters"] == {"requests": 12.0}
    clock.now += 3600
    hour = rolling.snapshot()["1h"]
    assert hour["counters"] == {} and hour["sketches"] == {}
    assert 3590.0 <= hour["seconds"] <= 3600.0


def test_a_window_reports_the_seconds_it_covers() -> None:
    clock = FakeClock()
    rolling = Rolling(clock=clock)
    clock.now += 25
    shown = rolling.snapshot()
    assert shown["1m"]["seconds"] == 25.0
    clock.now += 1000
    shown = rolling.snapshot()
    assert 50.0 <= shown["1m"]["seconds"] <= 60.0
    assert 290.0 <= shown["5m"]["seconds"] <= 300.0
