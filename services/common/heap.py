"""The garbage collector's settings for a long-running service process.

CPython's full (generation 2) collection walks every tracked object: in a relay that has imported
FastAPI, gRPC, protobuf and aiokafka that is a few hundred thousand objects, 80-150 ms of CPU during
which the event loop stands still (measured at 200 requests/s, bench scenario 3: each such pause
delays the ~20 requests that arrive meanwhile, which alone is the p99). Nearly all of those objects
are created at import and start-up and live as long as the process. :func:`freeze_startup_heap`
moves them to the permanent generation, which collections never scan, and makes young collections
rarer: most request garbage is freed by reference counting, so the generation-0 counter mostly
grows with objects that stay (caches, pooled connections), and a larger threshold trades several
short collections for one that is still well under a millisecond.
"""

from __future__ import annotations

import gc

__all__ = ["YOUNG_THRESHOLD", "freeze_startup_heap"]

# Net container allocations between young collections (CPython's default is 700).
YOUNG_THRESHOLD = 10_000


def freeze_startup_heap() -> None:
    """Collect once, then keep everything alive now out of every later collection; call it when the
    process has imported what it serves with, just before serving."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
