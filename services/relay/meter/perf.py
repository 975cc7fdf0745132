"""The relay's in-process performance windows: what the performance view needs that Prometheus's
coarse histograms cannot give (percentiles within 1 %), recorded once per finished request.

Counters (requests by fault, cache hits, quota round trips) are not recorded here: the snapshot reads
them from the Prometheus series the relay keeps anyway (:mod:`services.relay.pipeline.performance`).
"""

from __future__ import annotations

from services.common.rolling import Rolling
from services.relay.meter.record import Exchange

# Distribution names in the snapshot.
LATENCY = "latency"
OVERHEAD = "overhead"
STREAM_TTFB = "stream_ttfb"
PRODUCE = "kafka_produce"


class PerfRecorder:
    """Latency, gateway overhead, stream time to first byte and Kafka produce latency, windowed."""

    def __init__(self, rolling: Rolling | None = None) -> None:
        self.rolling = rolling or Rolling()

    def finished(self, exchange: Exchange) -> None:
        """One request is over (the hot path: a few dict updates)."""
        rolling = self.rolling
        elapsed = exchange.elapsed_s()
        rolling.observe(LATENCY, elapsed)
        rolling.observe(OVERHEAD, max(0.0, elapsed - exchange.upstream_s))

    def first_byte(self, seconds: float) -> None:
        """A stream's first byte reached the client ``seconds`` after the request arrived."""
        self.rolling.observe(STREAM_TTFB, seconds)

    def produced(self, seconds: float) -> None:
        """One batch of usage events was acknowledged by Kafka after ``seconds``."""
        self.rolling.observe(PRODUCE, seconds)
