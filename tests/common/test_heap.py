"""The collector's settings for service processes: the start-up heap is out of every collection."""

from __future__ import annotations

import subprocess
import sys

import orjson

# Run in a fresh interpreter: freezing is process-wide, and the test process's own heap is not a
# service's.
_PROBE = """
import gc, orjson
import services.relay.edge.http.app  # what the relay imports before serving
from services.common.heap import YOUNG_THRESHOLD, freeze_startup_heap
before = len(gc.get_objects())
freeze_startup_heap()
print(orjson.dumps({
    "before": before,
    "scanned": len(gc.get_objects()),
    "frozen": gc.get_freeze_count(),
    "young": gc.get_threshold()[0],
    "expected_young": YOUNG_THRESHOLD,
}).decode())
"""


def test_a_full_collection_after_start_up_no_longer_walks_the_imported_heap() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=60, check=True
    )
    figures = orjson.loads(result.stdout)
    # Hundreds of thousands of objects were reachable by a full collection; now a handful.
    assert figures["before"] > 50_000
    assert figures["frozen"] >= figures["before"] // 2
    assert figures["scanned"] < figures["frozen"] // 100
    assert figures["young"] == figures["expected_young"] > 700
