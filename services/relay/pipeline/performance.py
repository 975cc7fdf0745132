"""The live performance view (``GET /admin/v1/performance``): snapshots of every relay (and of the
logger, quota and auth processes), merged.

Each relay posts, every second, its windows (:class:`~services.relay.meter.perf.PerfRecorder`'s sketches
plus counters read from its Prometheus series) and its gauges right now; the view adds the counters,
merges the sketches bucket by bucket (so percentiles are over all relays' requests, within
``sketch.RELATIVE_ERROR``) and sums or lists the gauges. The document's shape is in the README
("Performance view").
"""

from __future__ import annotations

import time
from typing import Any

from services.common import sketch as sketches
from services.common.perfboard import CounterFeed, sum_counters, totals
from services.common.rolling import WINDOWS
from services.common.sketch import Sketch
from services.common.telemetry import METRICS
from services.relay.meter.perf import LATENCY, OVERHEAD, PRODUCE, STREAM_TTFB, PerfRecorder
from services.relay.stream.streaming import Streams
from services.relay.upstream.channels import ChannelDirectory
from services.relay.upstream.proxy import Upstreams

FAULTS = ("caller", "policy", "provider", "gateway")


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
            "now": {
                "active_streams": self._streams.active,
                "draining_streams": self._streams.draining,
                "kafka_queued": totals(METRICS.events_queued).get("", 0.0),
                "kafka_spooled": totals(METRICS.events_spooled).get("", 0.0),
                "kafka_spool_bytes": totals(METRICS.events_spool_bytes).get("", 0.0),
                "channels": [
                    {k: c[k] for k in ("name", "breaker", "connections", "in_flight", "idle", "waiting")}
                    for c in channels
                ],
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
        "stream_ttfb_ms": _percentiles(merged.get(STREAM_TTFB, empty), (0.5, 0.99)),
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
    }


def _channels(relays: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_name: dict[str, dict[str, Any]] = {}
    for relay in relays:
        for channel in relay["now"]["channels"]:
            shown = by_name.setdefault(
                channel["name"],
                {
                    "name": channel["name"],
                    "connections": 0,
                    "in_flight": 0,
                    "idle": 0,
                    "waiting": 0,
                    "breakers": {"closed": 0, "half_open": 0, "open": 0},
                },
            )
            for key in ("connections", "in_flight", "idle", "waiting"):
                shown[key] += channel[key]
            breakers: dict[str, int] = shown["breakers"]
            breakers[channel["breaker"]] = breakers.get(channel["breaker"], 0) + 1
    return [by_name[name] for name in sorted(by_name)]


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
    return {
        "generated_at_ms": int(time.time() * 1000),
        "percentiles": {"sketch": "log-buckets", "relative_error": round(sketches.RELATIVE_ERROR, 4)},
        "sources": [
            {"service": s["service"], "instance": s["instance"], "at_ms": s["at_ms"]} for s in snapshots
        ],
        "windows": {name: _window(name, relays, services) for name in WINDOWS},
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
