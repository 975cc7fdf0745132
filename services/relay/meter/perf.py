"""The relay's in-process performance windows: what the performance view needs that Prometheus's
coarse histograms cannot give (percentiles within 1 %), recorded once per finished request.

Counters (requests by fault, cache hits, quota round trips) are not recorded here: the snapshot reads
them from the Prometheus series the relay keeps anyway (:mod:`services.relay.pipeline.performance`).
Two things no series has are: each channel's requests, failures and upstream time to first byte (by
the channel that answered last, under :func:`channel_names`), and the per-minute series of the last hour
(requests are its latency sketch's count, failures counted by fault class).
"""

from __future__ import annotations

from services.common.minutes import Minutes
from services.common.rolling import Rolling
from services.relay.meter.record import Exchange

# Distribution names in the snapshot.
LATENCY = "latency"
OVERHEAD = "overhead"
STREAM_TTFB = "stream_ttfb"
PRODUCE = "kafka_produce"
# The faults that count against the channel a request was answered by (or failed on) last.
CHANNEL_FAULTS = frozenset({"provider", "gateway"})
CHANNEL_PREFIX = "channel:"


def channel_names(channel_id: str) -> tuple[str, str, str]:
    """The window names of a channel's requests, failures and upstream time to first byte."""
    base = f"{CHANNEL_PREFIX}{channel_id}:"
    return base + "requests", base + "errors", base + "ttfb"


class PerfRecorder:
    """Latency, gateway overhead, stream time to first byte and Kafka produce latency, windowed."""

    def __init__(self, rolling: Rolling | None = None, minutes: Minutes | None = None) -> None:
        self.rolling = rolling or Rolling()
        self.minutes = minutes or Minutes()
        self._channel_names: dict[str, tuple[str, str, str]] = {}

    def finished(self, exchange: Exchange) -> None:
        """One request is over (the hot path: a few dict updates)."""
        rolling = self.rolling
        elapsed = exchange.elapsed_s()
        rolling.observe(LATENCY, elapsed)
        rolling.observe(OVERHEAD, max(0.0, elapsed - exchange.upstream_s))
        self.minutes.observe(LATENCY, elapsed)
        error = exchange.error
        if error is not None:
            self.minutes.add("fault." + error.fault)
        channel_id = exchange.channel_id
        if channel_id:
            names = self._channel_names.get(channel_id)
            if names is None:
                names = self._channel_names[channel_id] = channel_names(channel_id)
            rolling.add(names[0])
            if error is not None and error.fault in CHANNEL_FAULTS:
                rolling.add(names[1])
            if exchange.ttfb_s > 0:
                rolling.observe(names[2], exchange.ttfb_s)

    def first_byte(self, seconds: float) -> None:
        """A stream's first byte reached the client ``seconds`` after the request arrived."""
        self.rolling.observe(STREAM_TTFB, seconds)

    def produced(self, seconds: float) -> None:
        """One batch of usage events was acknowledged by Kafka after ``seconds``."""
        self.rolling.observe(PRODUCE, seconds)
