"""The live performance view (``GET /admin/v1/performance``): snapshots of every relay (and of the
logger, quota and auth processes), merged.

Each relay posts, every second, its windows (:class:`~services.relay.meter.perf.PerfRecorder`'s sketches
plus counters read from its Prometheus series) and its gauges right now; the view adds the counters,
merges the sketches bucket by bucket (so percentiles are over all relays' requests, within
``sketch.RELATIVE_ERROR``) and sums or lists the gauges. Each relay also posts the last hour minute by
minute (:class:`~services.common.minutes.Minutes`), which the view adds up the same way into one series
of the whole deployment. The document's shape is in the README ("Performance view").
"""

from __future__ import annotations

import time
from typing import Any

from services.common import sketch as sketches
from services.common.minutes import KEEP, MINUTE_S
from services.common.perfboard import CounterFeed, sum_counters, totals
from services.common.rolling import WINDOWS
from services.common.sketch import Sketch
from services.common.telemetry import METRICS
from services.relay.meter.perf import (
    CHANNEL_PREFIX,
    LATENCY,
    OVERHEAD,
    PRODUCE,
    STREAM_TTFB,
    PerfRecorder,
    channel_names,
)
from services.relay.stream.streaming import Streams
from services.relay.upstream.channels import ChannelDirectory
from services.relay.upstream.proxy import Upstreams

FAULTS = ("caller", "policy", "provider", "gateway")
# What a relay posts of each channel right now.
_CHANNEL_NOW = ("channel_id", "name", "breaker", "retry_in_s", "connections", "in_flight", "idle", "waiting")
_POOL = ("connections", "in_flight", "idle", "waiting")


def relay_counters() -> dict[str, float]:
    """The relay's cumulative counts the view needs, from its Prometheus series."""
    found: dict[str, float] = {}
    for fault, n in totals(METRICS.http_requests, "error_type").items():
        found["requests"] = found.get("requests", 0.0) + n
        if fault:
            found[f"fault.{fault}"] = n
    verified = totals(METRICS.auth_verify, "source")
    found["key_cache.hit"] = verified.get("relay_cache", 0.0)
    found["key_cache.miss"] = verified.get("auth", 0.0)
    for result, n in totals(METRICS.response_cache, "result").items():
        found[f"response_cache.{result}"] = n
    found["quota.reserve"] = totals(METRICS.relay_credit_admissions, "path").get("exact", 0.0)
    found["quota.sync"] = sum(totals(METRICS.relay_credit_syncs).values())
    for result, n in totals(METRICS.events_produced, "result").items():
        found[f"kafka.{result}"] = n
    return found


class RelaySnapshot:
    """Builds this relay's snapshot (called every second by the board, and by the view)."""

    def __init__(
        self,
        instance: str,
        recorder: PerfRecorder,
        *,
        streams: Streams,
        upstreams: Upstreams,
        channels: ChannelDirectory,
    ) -> None:
        self.instance = instance
        self._recorder = recorder
        self._feed = CounterFeed(recorder.rolling, relay_counters)
        self._streams = streams
        self._upstreams = upstreams
        self._channels = channels

    def __call__(self) -> dict[str, Any]:
        self._feed.sample()
        channels = self._upstreams.status(self._channels.table.channels)
        return {
            "service": "relay",
            "instance": self.instance,
            "at_ms": int(time.time() * 1000),
            "windows": self._recorder.rolling.snapshot(),
            "minutes": self._recorder.minutes.snapshot(),
            "now": {
                "active_streams": self._streams.active,
                "draining_streams": self._streams.draining,
                "kafka_queued": totals(METRICS.events_queued).get("", 0.0),
                "kafka_spooled": totals(METRICS.events_spooled).get("", 0.0),
                "kafka_spool_bytes": totals(METRICS.events_spool_bytes).get("", 0.0),
                "channels": [{k: c[k] for k in _CHANNEL_NOW} for c in channels],
            },
        }


# -- the view -------------------------------------------------------------------------------------


def _ms(value: float) -> float:
    return round(value * 1000, 3)


def _percentiles(sketch: Sketch, qs: tuple[float, ...]) -> dict[str, float]:
    shown: dict[str, float] = {"count": sketch.count}
    for q, value in zip(qs, sketch.quantiles(qs), strict=True):
        shown[f"p{round(q * 100)}"] = _ms(value)
    return shown


def _ratio(part: float, whole: float) -> float | None:
    return round(part / whole, 4) if whole else None


def _window(name: str, relays: list[dict[str, Any]], services: list[dict[str, Any]]) -> dict[str, Any]:
    parts = [r["windows"][name] for r in relays if name in r.get("windows", {})]
    counters = sum_counters(p["counters"] for p in parts)
    merged: dict[str, Sketch] = {}
    for part in parts:
        for key, wire in part["sketches"].items():
            merged.setdefault(key, Sketch()).merge_wire(wire)
    seconds = max((p["seconds"] for p in parts), default=0.0)
    # Each relay's rate over the time it covered, summed: relays started at different times add up.
    rate = sum(p["counters"].get("requests", 0.0) / p["seconds"] for p in parts if p["seconds"] > 0)
    requests = counters.get("requests", 0.0)
    faults = {fault: counters.get(f"fault.{fault}", 0.0) for fault in FAULTS}
    errors = sum(faults.values())
    key_hit, key_miss = counters.get("key_cache.hit", 0.0), counters.get("key_cache.miss", 0.0)
    hit, miss = counters.get("response_cache.hit", 0.0), counters.get("response_cache.miss", 0.0)
    trips = counters.get("quota.reserve", 0.0) + counters.get("quota.sync", 0.0)
    empty = Sketch()
    svc = sum_counters(s["windows"][name]["counters"] for s in services if name in s.get("windows", {}))
    batches = svc.get("logger.batches", 0.0)
    reads_replica, reads_primary = svc.get("db_reads.replica", 0.0), svc.get("db_reads.primary", 0.0)
    return {
        "seconds": seconds,
        "requests": int(requests),
        "requests_per_s": round(rate, 3),
        "errors": {
            "count": int(errors),
            "rate": _ratio(errors, requests),
            "by_fault": {
                fault: {"count": int(n), "rate": _ratio(n, requests)} for fault, n in faults.items()
            },
        },
        "latency_ms": _percentiles(merged.get(LATENCY, empty), (0.5, 0.95, 0.99)),
        "overhead_ms": _percentiles(merged.get(OVERHEAD, empty), (0.5, 0.95, 0.99)),
        "stream_ttfb_ms": _percentiles(merged.get(STREAM_TTFB, empty), (0.5, 0.95, 0.99)),
        "key_cache": {
            "hits": int(key_hit),
            "misses": int(key_miss),
            "hit_ratio": _ratio(key_hit, key_hit + key_miss),
        },
        "response_cache": {"hits": int(hit), "misses": int(miss), "hit_ratio": _ratio(hit, hit + miss)},
        "quota": {
            "reserve_rpcs": int(counters.get("quota.reserve", 0.0)),
            "credit_syncs": int(counters.get("quota.sync", 0.0)),
            "round_trips_per_request": _ratio(trips, requests),
        },
        "kafka": {
            "produce_ms": _percentiles(merged.get(PRODUCE, empty), (0.5, 0.95, 0.99)),
            "sent": int(counters.get("kafka.sent", 0.0)),
            "failed": int(counters.get("kafka.failed", 0.0)),
        },
        "logger": {
            "batches": int(batches),
            "rows": int(svc.get("logger.rows", 0.0)),
            "batch_mean_ms": _ms(svc.get("logger.batch_seconds", 0.0) / batches) if batches else None,
        },
        "replica_routing": {
            "replica_reads": int(reads_replica),
            "primary_reads": int(reads_primary),
            "replica_share": _ratio(reads_replica, reads_replica + reads_primary),
        },
        "channels": _channel_windows(counters, merged),
    }


def _channel_windows(counters: dict[str, float], merged: dict[str, Sketch]) -> dict[str, dict[str, Any]]:
    """Per channel id: the requests it answered last, how many failed on it, its upstream TTFB."""
    ids = {
        name[len(CHANNEL_PREFIX) :].rpartition(":")[0] for name in counters if name.startswith(CHANNEL_PREFIX)
    }
    shown: dict[str, dict[str, Any]] = {}
    for channel_id in sorted(ids):
        requests, errors, ttfb = channel_names(channel_id)
        n, failed = counters.get(requests, 0.0), counters.get(errors, 0.0)
        shown[channel_id] = {
            "requests": int(n),
            "errors": {"count": int(failed), "rate": _ratio(failed, n)},
            "ttfb_ms": _percentiles(merged.get(ttfb, Sketch()), (0.5, 0.95, 0.99)),
        }
    return shown


def _channels(relays: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each channel's pools summed over the relays, and its breaker on each relay (they trip apart)."""
    by_id: dict[str, dict[str, Any]] = {}
    for relay in relays:
        for channel in relay["now"]["channels"]:
            # Snapshots of relays older than channel ids in them are keyed by name.
            key = channel.get("channel_id") or channel["name"]
            shown = by_id.setdefault(
                key,
                {
                    "channel_id": channel.get("channel_id", ""),
                    "name": channel["name"],
                    **dict.fromkeys(_POOL, 0),
                    "breakers": {"closed": 0, "half_open": 0, "open": 0},
                    "by_relay": [],
                },
            )
            for name in _POOL:
                shown[name] += channel[name]
            breakers: dict[str, int] = shown["breakers"]
            breakers[channel["breaker"]] = breakers.get(channel["breaker"], 0) + 1
            shown["by_relay"].append(
                {
                    "instance": relay["instance"],
                    "breaker": channel["breaker"],
                    "retry_in_s": channel.get("retry_in_s", 0.0),
                }
            )
    return sorted(by_id.values(), key=lambda c: (c["name"], c["channel_id"]))


def _minutes(relays: list[dict[str, Any]], now_ms: int) -> list[dict[str, Any]]:
    """The last hour minute by minute, every relay's minutes added up; minutes nobody posted are 0."""
    counters: dict[int, dict[str, float]] = {}
    latency: dict[int, Sketch] = {}
    for relay in relays:
        for minute in relay.get("minutes", ()):
            at = minute["minute_ms"]
            mine = counters.setdefault(at, {})
            for name, value in minute["counters"].items():
                mine[name] = mine.get(name, 0.0) + value
            wire = minute["sketches"].get(LATENCY)
            if wire:
                latency.setdefault(at, Sketch()).merge_wire(wire)
    step = MINUTE_S * 1000
    last = now_ms // step * step
    series: list[dict[str, Any]] = []
    for at in range(last - (KEEP - 1) * step, last + step, step):
        sketch = latency.get(at, Sketch())
        faults = {fault: int(counters.get(at, {}).get(f"fault.{fault}", 0.0)) for fault in FAULTS}
        series.append(
            {
                "at_ms": at,
                "requests": sketch.count,
                "errors": {"count": sum(faults.values()), "by_fault": faults},
                "latency_ms": _percentiles(sketch, (0.5, 0.99)),
            }
        )
    return series


def view(snapshots: list[dict[str, Any]]) -> dict[str, Any]:
    """The performance document from every live snapshot."""
    relays = [s for s in snapshots if s.get("service") == "relay"]
    services = [s for s in snapshots if s.get("service") != "relay"]
    replicas: dict[str, dict[str, float]] = {}
    for service in services:
        now = service["now"]
        for replica, lag in now["replicas"].items():
            seen = replicas.setdefault(replica, {"lag_bytes": 0.0, "healthy": 1.0})
            seen["lag_bytes"] = max(seen["lag_bytes"], lag)
        for replica, healthy in now["replicas_healthy"].items():
            seen = replicas.setdefault(replica, {"lag_bytes": 0.0, "healthy": 1.0})
            seen["healthy"] = min(seen["healthy"], healthy)
    loggers = [s for s in services if s.get("service") == "logger"]
    now_ms = int(time.time() * 1000)
    return {
        "generated_at_ms": now_ms,
        "percentiles": {"sketch": "log-buckets", "relative_error": round(sketches.RELATIVE_ERROR, 4)},
        "sources": [
            {"service": s["service"], "instance": s["instance"], "at_ms": s["at_ms"]} for s in snapshots
        ],
        "windows": {name: _window(name, relays, services) for name in WINDOWS},
        "minutes": _minutes(relays, now_ms),
        "now": {
            "relays": len(relays),
            "active_streams": sum(r["now"]["active_streams"] for r in relays),
            "draining_streams": sum(r["now"]["draining_streams"] for r in relays),
            "channels": _channels(relays),
            "kafka": {
                "queued": int(sum(r["now"]["kafka_queued"] for r in relays)),
                "spooled": int(sum(r["now"]["kafka_spooled"] for r in relays)),
                "spool_bytes": int(sum(r["now"]["kafka_spool_bytes"] for r in relays)),
            },
            "logger": {
                "lag": int(sum(s["now"]["logger_lag"] for s in loggers)),
                "paused": any(s["now"]["logger_paused"] for s in loggers),
                "instances": len(loggers),
            },
            "replicas": [
                {"replica": name, "lag_bytes": int(seen["lag_bytes"]), "healthy": bool(seen["healthy"])}
                for name, seen in sorted(replicas.items())
            ],
        },
    }
