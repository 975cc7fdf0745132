"""Structured logs and the one declaration of metric names.

Every metric any service exports is declared here, once, with its kind and meaning, so a typo is a
type error rather than a silent new series. Labels are bounded: no key ids, user ids or request ids.

Each series also names the services that export it (:data:`OWNERS`): a service's ``/metrics`` serves
its own :func:`service_registry`, which holds only those series (and the process and runtime ones), so
no service lists another's series, empty. The collectors stay in prometheus_client's default registry
too, where in-process tests read them.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any

import orjson
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)

from services.common.tracing import current_trace_id

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


@dataclass(frozen=True, slots=True)
class ConsumerMetrics:
    """The series of one batch consumer of the usage topic (:mod:`services.common.consumer`)."""

    # Gauge by partition: messages beyond the offset the consumer last committed.
    lag: Gauge
    # Gauge: 1 while fetching is paused because writing a batch fails.
    paused: Gauge
    # Counter: failed attempts at writing a batch (the batch is kept and retried).
    write_failures: Counter
    # Histogram: items per written batch.
    batch_rows: Histogram
    # Histogram: seconds to write one batch (one transaction).
    batch_write: Histogram


class Metrics:
    """Prometheus series of all services (each process exports the ones it touches)."""

    def __init__(self) -> None:
        # The relay's request series are labelled with the front that took the request (``front``:
        # http or grpc). They keep their ``http_`` names from before the gRPC front, so dashboards and
        # alert rules that sum over the label count every request, as they did. ``status`` is the HTTP
        # status the outcome maps to on either front (a gRPC call's own code: relaygate_rpc_served).
        # Counter: requests answered by the relay, by front, route, status and whose fault a failure was.
        self.http_requests = Counter(
            "relaygate_http_requests", "Relay requests", ["front", "route", "status", "error_type"]
        )
        # Histogram: seconds from request start to the last byte, by front and route.
        self.http_latency = Histogram(
            "relaygate_http_latency_seconds",
            "Relay request latency",
            ["front", "route"],
            buckets=_LATENCY_BUCKETS,
        )
        # Histogram: gateway overhead = total time minus time waiting on the upstream.
        self.gateway_overhead = Histogram(
            "relaygate_gateway_overhead_seconds",
            "Time spent in the gateway",
            ["front", "route"],
            buckets=_LATENCY_BUCKETS,
        )
        # Histogram: upstream time to first byte, by channel.
        self.upstream_ttfb = Histogram(
            "relaygate_upstream_ttfb_seconds",
            "Upstream time to first byte",
            ["channel"],
            buckets=_LATENCY_BUCKETS,
        )
        # Counter: upstream attempts by channel and outcome (ok, status_5xx, status_429, timeout, ...).
        self.upstream_attempts = Counter(
            "relaygate_upstream_attempts", "Upstream attempts", ["channel", "outcome"]
        )
        # Counter: gRPC calls served, by service method and status code.
        self.rpc_served = Counter("relaygate_rpc_served", "gRPC calls served", ["method", "code"])
        # Histogram: gRPC server handling time.
        self.rpc_latency = Histogram(
            "relaygate_rpc_latency_seconds", "gRPC handling time", ["method"], buckets=_LATENCY_BUCKETS
        )
        # Counter: reads by routing target (replica or primary).
        self.db_reads = Counter("relaygate_db_reads", "Database read sessions by target", ["target"])
        # Gauge: 1 when a replica receives reads.
        self.db_replica_healthy = Gauge("relaygate_db_replica_healthy", "Replica routable", ["replica"])
        # Gauge: bytes of WAL a replica has not replayed yet.
        self.db_replica_lag_bytes = Gauge("relaygate_db_replica_lag_bytes", "Replica lag", ["replica"])
        # Counter: quota refusals by reason (insufficient_quota, rate_limit_exceeded, ...).
        self.quota_rejections = Counter("relaygate_quota_rejections", "Reservations refused", ["reason"])
        # Counter: reservations finished, by final state (settled, released, expired).
        self.quota_finished = Counter("relaygate_quota_finished", "Reservations finished", ["state"])
        # Counter: auth verifications by outcome (ok or the deny reason) and cache layer that answered.
        self.auth_verify = Counter("relaygate_auth_verify", "Key verifications", ["outcome", "source"])
        # Counter: usage events handed to Kafka, by result (sent, failed).
        self.events_produced = Counter("relaygate_events_produced", "Usage events produced", ["result"])
        # Gauge: events waiting in the relay's in-memory queue.
        self.events_queued = Gauge("relaygate_events_queued", "Usage events waiting to be produced")
        # Histogram: Kafka produce latency (send until acknowledged).
        self.events_produce_latency = Histogram(
            "relaygate_events_produce_seconds", "Kafka produce latency", buckets=_LATENCY_BUCKETS
        )
        # Histogram: rows per logger batch.
        self.logger_batch_rows = Histogram(
            "relaygate_logger_batch_rows", "Rows per batch", buckets=(1, 10, 100, 500, 1000, 5000, 20000)
        )
        # Histogram: seconds to write one logger batch (one transaction).
        self.logger_batch_write = Histogram(
            "relaygate_logger_batch_write_seconds", "Batch write time", buckets=_LATENCY_BUCKETS
        )
        # Histogram: seconds from the relay's event timestamp to the row being committed.
        self.logger_end_to_end = Histogram(
            "relaygate_logger_end_to_end_seconds", "Event to durable row", buckets=_LATENCY_BUCKETS
        )
        # Counter: failed attempts at writing + committing a logger batch (the batch is kept and retried).
        self.logger_write_failures = Counter("relaygate_logger_write_failures", "Failed batch write attempts")
        # Gauge: 1 while the logger has paused fetching because batch writes fail.
        self.logger_paused = Gauge("relaygate_logger_paused", "Logger fetching paused by failing writes")
        # Counter: events sent to the dead-letter topic, by reason class.
        self.logger_dead_letters = Counter(
            "relaygate_logger_dead_letters", "Dead-lettered events", ["reason"]
        )
        # -- relay: further series go below this line --
        # Gauge: upstream connections per channel pool, by state (idle, busy); plus requests waiting for one.
        self.upstream_pool_connections = Gauge(
            "relaygate_upstream_pool_connections", "Upstream pool connections", ["channel", "state"]
        )
        self.upstream_pool_waiting = Gauge(
            "relaygate_upstream_pool_waiting", "Requests waiting for an upstream connection", ["channel"]
        )
        # Histogram: seconds to open a new upstream connection (TCP, and TLS when https), by channel.
        self.upstream_connect = Histogram(
            "relaygate_upstream_connect_seconds",
            "Upstream connect time",
            ["channel"],
            buckets=_LATENCY_BUCKETS,
        )
        # Gauge: circuit breaker state per channel (0 closed, 1 half-open, 2 open).
        self.breaker_state = Gauge("relaygate_breaker_state", "Channel circuit breaker state", ["channel"])
        # Counter: breaker transitions, by channel and new state.
        self.breaker_transitions = Counter(
            "relaygate_breaker_transitions", "Channel circuit breaker transitions", ["channel", "to"]
        )
        # Histogram: seconds from a stream request's arrival to its first byte to the client, by front
        # and route.
        self.stream_ttfb = Histogram(
            "relaygate_stream_ttfb_seconds",
            "Stream time to first byte",
            ["front", "route"],
            buckets=_LATENCY_BUCKETS,
        )
        # Histogram: stream duration, from arrival to the end of the upstream stream, by front and route.
        self.stream_duration = Histogram(
            "relaygate_stream_duration_seconds",
            "Stream duration",
            ["front", "route"],
            buckets=_LATENCY_BUCKETS,
        )
        # Counter: streams ended, by reason (done, upstream_eof, upstream_error, timeout, client_gone).
        self.stream_end = Counter("relaygate_stream_end", "Streams ended", ["reason"])
        # Gauge: abandoned streams being read to their end for the usage.
        self.stream_drains = Gauge("relaygate_stream_drains", "Abandoned streams being drained")
        # Counter: response cache lookups by result (hit, miss, error) and entries stored (store).
        self.response_cache = Counter("relaygate_response_cache", "Response cache operations", ["result"])
        # Counter: requests that failed, by whose fault (caller, policy, provider, gateway) and error code.
        self.relay_failures = Counter("relaygate_relay_failures", "Failed requests", ["fault", "code"])
        # Counter: settlements retried in the background, by outcome (started, settled, gave_up).
        self.relay_settle_retries = Counter(
            "relaygate_relay_settle_retries", "Settlements retried off the response path", ["outcome"]
        )
        # Counter: metered requests by how they were admitted (lease: locally; exact: a Reserve RPC).
        self.relay_credit_admissions = Counter(
            "relaygate_relay_credit_admissions", "Requests admitted, by path", ["path"]
        )
        # Counter: the relay's credit syncs with quota, by outcome (ok, failed).
        self.relay_credit_syncs = Counter("relaygate_relay_credit_syncs", "Credit syncs sent", ["outcome"])
        # Gauge: usage events waiting in the on-disk spool, and its size in bytes.
        self.events_spooled = Gauge("relaygate_events_spooled", "Usage events in the spool")
        self.events_spool_bytes = Gauge("relaygate_events_spool_bytes", "Spool size in bytes")
        # Counter: usage events dropped because the spool was full.
        self.events_dropped = Counter("relaygate_events_dropped", "Usage events dropped (spool full)")
        # Counter: acknowledged events sent again after the broker was found to have lost them.
        self.events_resent = Counter("relaygate_events_resent", "Usage events re-sent after broker data loss")
        # -- quota: further series go below this line --
        # Counter: reserves whose rate/concurrency limits could not be checked (limit state unreachable),
        # by what happened to them (admitted: fail-open, refused: fail-closed).
        self.quota_limits_unchecked = Counter(
            "relaygate_quota_limits_unchecked", "Reserves with unchecked limits", ["result"]
        )
        # Gauge: 1 while the shared rate/concurrency limit state (Redis) is unreachable.
        self.quota_limits_degraded = Gauge("relaygate_quota_limits_degraded", "Limit state unreachable")
        # Histogram: operations per quota group commit (one transaction or Redis pipeline), by kind
        # (ledger, limits).
        self.quota_batch_size = Histogram(
            "relaygate_quota_batch_size",
            "Operations per transaction",
            ["kind"],
            buckets=(1, 2, 5, 10, 25, 50, 100),
        )
        # Counter: balance reads that had to see an earlier write, by where they went (replica, primary).
        self.quota_read_your_writes = Counter(
            "relaygate_quota_read_your_writes", "Read-your-write balance reads", ["target"]
        )
        # Gauge: messages in a partition not yet committed by quota's settling consumer.
        self.quota_settle_lag = Gauge("relaygate_quota_settle_lag", "Settling lag in messages", ["partition"])
        # Gauge: 1 while settling has paused fetching because charging a batch fails.
        self.quota_settle_paused = Gauge(
            "relaygate_quota_settle_paused", "Settling paused by failing charges"
        )
        # Counter: failed attempts at charging a batch (kept, retried; a repeat is idempotent).
        self.quota_settle_write_failures = Counter(
            "relaygate_quota_settle_write_failures", "Failed charge batch attempts"
        )
        # Histogram: charges per settling batch (one transaction).
        self.quota_settle_batch_rows = Histogram(
            "relaygate_quota_settle_batch_rows", "Charges per batch", buckets=(1, 10, 100, 500, 1000, 5000)
        )
        # Histogram: seconds to charge one settling batch.
        self.quota_settle_batch_write = Histogram(
            "relaygate_quota_settle_batch_write_seconds", "Charge batch time", buckets=_LATENCY_BUCKETS
        )
        # Counter: usage records read by settling, by result: charged (on a lease), settled (an exact
        # reservation), late (an exact reservation charged after it expired or was released),
        # unchanged (already charged or finished, or a zero cost), no_hold (neither a lease nor a
        # reservation), undecodable, invalid.
        self.quota_settle_records = Counter(
            "relaygate_quota_settle_records", "Usage records read by settling", ["result"]
        )
        # Counter: micro-units of charges that arrived after their lease or reservation was given back
        # and that what was free could not cover (on the books as cost, not taken from any balance).
        self.quota_written_off_micros = Counter(
            "relaygate_quota_written_off_micros", "Late charges written off, in micro-units"
        )
        # Histogram: seconds from the relay's event timestamp to the charge being committed.
        self.quota_settle_end_to_end = Histogram(
            "relaygate_quota_settle_end_to_end_seconds", "Event to committed charge", buckets=_LATENCY_BUCKETS
        )
        self.quota_settle_consumer = ConsumerMetrics(
            lag=self.quota_settle_lag,
            paused=self.quota_settle_paused,
            write_failures=self.quota_settle_write_failures,
            batch_rows=self.quota_settle_batch_rows,
            batch_write=self.quota_settle_batch_write,
        )
        # -- logger: further series go below this line --
        # Gauge: messages in a partition not yet committed by the logger (highwater minus committed offset).
        self.logger_consumer_lag = Gauge(
            "relaygate_logger_consumer_lag", "Logger lag in messages", ["partition"]
        )
        # Counter: rows offered to request_logs, by result (inserted, or duplicate of a stored event).
        self.logger_rows = Counter("relaygate_logger_rows", "Rows written by the logger", ["result"])
        # Counter: request_logs partitions changed by maintenance, by action (created, dropped).
        self.logger_partitions = Counter(
            "relaygate_logger_partitions", "Log partitions created or dropped", ["action"]
        )
        # Counter: failed partition maintenance passes (retried; partitions exist days ahead).
        self.logger_maintenance_failures = Counter(
            "relaygate_logger_maintenance_failures", "Failed partition maintenance passes"
        )
        # Counter: micro-units charged by the request-log rows written (each event once), by model: the
        # spend per model (only priced models are ever charged, so the label is bounded by the price book).
        self.logger_spend_micros = Counter(
            "relaygate_logger_spend_micros", "Charged micro-units in written request logs", ["model"]
        )
        self.logger_consumer = ConsumerMetrics(
            lag=self.logger_consumer_lag,
            paused=self.logger_paused,
            write_failures=self.logger_write_failures,
            batch_rows=self.logger_batch_rows,
            batch_write=self.logger_batch_write,
        )
        # -- auth: further series go below this line --
        # Gauge: principals in the relay's verified-key cache.
        self.relay_auth_cache_entries = Gauge("relaygate_relay_auth_cache_entries", "Cached principals")
        # Gauge: 1 while the relay follows auth's key invalidations (its cache then trusts entries longer).
        self.relay_key_invalidations_followed = Gauge(
            "relaygate_relay_key_invalidations_followed", "Key invalidations followed"
        )


METRICS = Metrics()

SERVICES = ("auth", "quota", "logger", "relay")
_RELAY = frozenset({"relay"})
_QUOTA = frozenset({"quota"})
_LOGGER = frozenset({"logger"})
# Served over gRPC by services/common/grpc (the relay too, with its gRPC front) and reading the
# database through services/common/db/routing.
_GRPC = frozenset({"auth", "quota", "logger", "relay"})
_DATABASE = frozenset({"auth", "quota", "logger"})

# Attribute of :data:`METRICS` -> the services that export it. Every series is listed (checked below).
OWNERS: dict[str, frozenset[str]] = {
    "http_requests": _RELAY,
    "http_latency": _RELAY,
    "gateway_overhead": _RELAY,
    "upstream_ttfb": _RELAY,
    "upstream_attempts": _RELAY,
    "rpc_served": _GRPC,
    "rpc_latency": _GRPC,
    "db_reads": _DATABASE,
    "db_replica_healthy": _DATABASE,
    "db_replica_lag_bytes": _DATABASE,
    "quota_rejections": _QUOTA,
    "quota_finished": _QUOTA,
    # auth verifies keys; the relay counts the verifications its own cache answered.
    "auth_verify": frozenset({"auth", "relay"}),
    "events_produced": _RELAY,
    "events_queued": _RELAY,
    "events_produce_latency": _RELAY,
    "logger_batch_rows": _LOGGER,
    "logger_batch_write": _LOGGER,
    "logger_end_to_end": _LOGGER,
    "logger_write_failures": _LOGGER,
    "logger_paused": _LOGGER,
    "logger_dead_letters": _LOGGER,
    "upstream_pool_connections": _RELAY,
    "upstream_pool_waiting": _RELAY,
    "upstream_connect": _RELAY,
    "breaker_state": _RELAY,
    "breaker_transitions": _RELAY,
    "stream_ttfb": _RELAY,
    "stream_duration": _RELAY,
    "stream_end": _RELAY,
    "stream_drains": _RELAY,
    "response_cache": _RELAY,
    "relay_failures": _RELAY,
    "relay_settle_retries": _RELAY,
    "relay_credit_admissions": _RELAY,
    "relay_credit_syncs": _RELAY,
    "events_spooled": _RELAY,
    "events_spool_bytes": _RELAY,
    "events_dropped": _RELAY,
    "events_resent": _RELAY,
    "quota_limits_unchecked": _QUOTA,
    "quota_limits_degraded": _QUOTA,
    "quota_batch_size": _QUOTA,
    "quota_read_your_writes": _QUOTA,
    "quota_settle_lag": _QUOTA,
    "quota_settle_paused": _QUOTA,
    "quota_settle_write_failures": _QUOTA,
    "quota_settle_batch_rows": _QUOTA,
    "quota_settle_batch_write": _QUOTA,
    "quota_settle_records": _QUOTA,
    "quota_written_off_micros": _QUOTA,
    "quota_settle_end_to_end": _QUOTA,
    "logger_consumer_lag": _LOGGER,
    "logger_rows": _LOGGER,
    "logger_partitions": _LOGGER,
    "logger_maintenance_failures": _LOGGER,
    "logger_spend_micros": _LOGGER,
    "relay_auth_cache_entries": _RELAY,
    "relay_key_invalidations_followed": _RELAY,
}


def _collectors() -> dict[str, Counter | Gauge | Histogram]:
    return {
        name: value for name, value in vars(METRICS).items() if isinstance(value, Counter | Gauge | Histogram)
    }


if set(_collectors()) != set(OWNERS):
    raise RuntimeError(f"series without an owner: {sorted(set(_collectors()) ^ set(OWNERS))}")


@functools.cache
def service_registry(service: str) -> CollectorRegistry:
    """What ``service``'s ``/metrics`` serves: its own series, the process's and the runtime's."""
    if service not in SERVICES:
        raise ValueError(f"unknown service {service!r}")
    registry = CollectorRegistry(auto_describe=True)
    for runtime in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(runtime)
    for name, series in _collectors().items():
        if service in OWNERS[name]:
            registry.register(series)
    return registry


# Characters that must never reach a log file raw: C0 and C1 controls and DEL (line breaks, terminal escape
# sequences), the Unicode line and paragraph separators, and the bidirectional overrides that can make a
# line display as something else. Caller-controlled text (model names, headers, messages) is in log lines.
_UNSAFE = [
    *range(0x20),
    0x7F,
    *range(0x80, 0xA0),
    0x2028,
    0x2029,
    *range(0x202A, 0x202F),
    *range(0x2066, 0x206A),
]
_NAMED = {0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"}
# Text lines: one record per physical line, every unsafe character written as a visible escape.
_TEXT_ESCAPES = {c: _NAMED.get(c, f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}") for c in _UNSAFE}
# JSON lines: the encoder already escapes C0; the rest becomes \uXXXX, which is the same string to a parser.
_JSON_ESCAPES = {c: f"\\u{c:04x}" for c in _UNSAFE if c >= 0x20}


def escape_control(text: str) -> str:
    """``text`` with every control, line-separator and bidi-override character written as an escape."""
    return text.translate(_TEXT_ESCAPES)


def _extras(record: logging.LogRecord, reserved: frozenset[str]) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in reserved and not k.startswith("_")}


_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id and any ``extra`` fields."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id:
            payload["request_id"] = request_id
        trace_id = current_trace_id()
        if trace_id:
            payload["trace_id"] = trace_id
        payload.update(_extras(record, _RESERVED))
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(payload, default=str).decode().translate(_JSON_ESCAPES)


class TextFormatter(logging.Formatter):
    """``time service LEVEL logger: message key=value ...`` on exactly one line.

    Line breaks and escape sequences inside the message, the ``extra`` fields or a traceback are written
    as visible escapes (``\\n``, ``\\x1b``), so nothing a caller sends can start a line of its own.
    """

    def __init__(self, service: str) -> None:
        super().__init__(f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        record.asctime = self.formatTime(record, self.datefmt)
        request_id = request_id_var.get()
        fields = {"request_id": request_id} if request_id else {}
        trace_id = current_trace_id()
        if trace_id:
            fields["trace_id"] = trace_id
        fields.update(_extras(record, _RESERVED))
        line = self.formatMessage(record) + "".join(f" {k}={_text_value(v)}" for k, v in fields.items())
        if record.exc_info:
            line += " | " + self.formatException(record.exc_info)
        if record.stack_info:
            line += " | " + self.formatStack(record.stack_info)
        return escape_control(line)


def _text_value(value: object) -> str:
    text = str(value)
    if text and not any(c in text for c in ' ="'):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def setup_logging(service: str, *, level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service) if fmt == "json" else TextFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # The Kafka client logs every reconnect attempt as a warning; our own code reports outages once.
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    # httpx logs every request at INFO: one line per upstream call is the access log's job, not ours.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def start_metrics_server(listen: str, service: str) -> None:
    """Serve ``service``'s ``/metrics`` on ``host:port`` (a daemon thread); empty = disabled."""
    if not listen:
        return
    from prometheus_client import start_http_server

    host, _, port = listen.rpartition(":")
    start_http_server(int(port), addr=host or "127.0.0.1", registry=service_registry(service))
