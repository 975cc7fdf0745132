"""The scenarios. Each measures the baseline and relaygate side by side in the same run and returns a
:class:`~bench.report.ScenarioResult`; ``bench/README.md`` says what each one means and how to read it.

Every load loop is bounded: wrk by ``-d`` (and a kill deadline), the harness's clients by explicit
deadlines and timeouts. All traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import grpc
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench import httpclient
from bench.env import MODEL, UPSTREAM_CHUNKS, BenchEnv
from bench.load import WrkResult, run_wrk
from bench.procstat import CpuWindow, Tracked, memory_mb
from bench.report import Measurement, Metric, ScenarioResult, percentile
from services.common.events import encode
from services.common.pb.relaygate.common.v1.types_pb2 import Usage
from services.common.pb.relaygate.events.v1.events_pb2 import UsageEvent
from services.common.pb.relaygate.quota.v1 import quota_pb2
from services.common.pb.relaygate.quota.v1.quota_pb2_grpc import QuotaServiceStub
from services.relay.settings import RelaySettings

__all__ = ["SCENARIOS", "Bench", "Settings", "Target"]

CHAT_PATH = "/v1/chat/completions"
PROMPT = [{"role": "user", "content": "Say hello to the benchmark, twenty words please."}]
# Of the 50 connections of scenario 2, this many belong to the time-to-first-byte probe.
TTFB_PROBE_CONNECTIONS = 5
TTFB_PROBE_PAUSE_S = 0.01
WARM_UP_S = 3.0  # per target, before the first scenario
WARM_UP_CONNECTIONS = 10


@dataclass(frozen=True)
class Settings:
    duration_s: float = 15
    runs: int = 3
    connections: int = 50
    rates: tuple[float, ...] = (20, 200)  # scenario 3
    streams: int = 2000  # scenario 4
    stream_open_rate: float = 500  # scenario 4, new streams per second
    ingest_rate: float = 1000  # scenario 5, paced phase, events per second
    ingest_burst: int = 20_000  # scenario 5, burst phase
    quota_tasks: int = 50  # scenario 6
    growth_keys: int = 10_000  # scenario 7
    growth_channels: int = 50  # scenario 7
    auth_keys: int = 2000  # scenario 8, keys verified cold once, then warm
    paced_connections: int = 10  # scenario 9, concurrent paced streams
    wrk: str = "wrk"


@dataclass(frozen=True)
class Target:
    """Something to send chat completions to: ``origin`` has the OpenAI API under ``/v1``."""

    name: str
    origin: str
    server: str  # the tracked process whose memory matters for this target
    gateway: str  # the tracked process(es) whose CPU is "the gateway's" ("" for direct)
    keys: tuple[str, ...]
    keys_file: Path
    headers: tuple[tuple[str, str], ...] = ()  # sent on every request (routing for a peer gateway)

    @property
    def port(self) -> int:
        return int(self.origin.rsplit(":", 1)[1])


@dataclass
class Bench:
    env: BenchEnv
    settings: Settings
    peers: list[Target] = field(default_factory=list)

    def __post_init__(self) -> None:
        work = self.env.work_dir
        self.body_plain = _write(
            work / "body-plain.json", {"model": MODEL, "messages": PROMPT, "max_tokens": 20}
        )
        self.body_stream = _write(
            work / "body-stream.json", {"model": MODEL, "messages": PROMPT, "max_tokens": 20, "stream": True}
        )
        keys = tuple(self.env.keys)
        keys_file = self.env.keys_file(self.env.keys, "keys-base.txt")
        self.direct = Target("direct", self.env.direct_url, "upstream", "", keys, keys_file)
        self.relaygate = Target("relaygate", self.env.relay_url, "relay", "relaygate", keys, keys_file)

    def http_targets(self) -> list[Target]:
        return [self.direct, self.relaygate, *self.peers]

    def warm_up(self) -> None:
        """A few seconds of plain and streaming requests to every target before anything is measured.

        Node's JIT (a peer) and every gateway's connection pools and caches start cold; without this the
        first scenario would measure a start-up phase the others do not see.
        """
        seconds = min(WARM_UP_S, self.settings.duration_s)
        for target in self.http_targets():
            for body in (self.body_plain, self.body_stream):
                httpclient.run(
                    httpclient.probe(
                        "127.0.0.1",
                        target.port,
                        self.requests_for(target, body),
                        connections=WARM_UP_CONNECTIONS,
                        duration_s=seconds / 2,
                    )
                )

    @property
    def tracked(self) -> list[Tracked]:
        return self.env.tracked

    @contextlib.contextmanager
    def window(self) -> Iterator[CpuWindow]:
        with CpuWindow(self.tracked) as window:
            yield window

    def measurement(
        self,
        name: str,
        figures: dict[str, float],
        units: int,
        window: CpuWindow,
        loadgen_ms: float,
        *,
        gateway: str = "relaygate",
    ) -> Measurement:
        cpu = {**window.cpu_ms, "loadgen": loadgen_ms}
        memory = memory_mb(self.tracked)
        return Measurement(name, figures, units, cpu, memory, round(window.wall_s, 2), gateway=gateway)

    def requests_for(self, target: Target, body: Path) -> list[bytes]:
        raw = body.read_bytes()
        return [
            httpclient.build_request("127.0.0.1", target.port, CHAT_PATH, raw, key, target.headers)
            for key in target.keys
        ]


def _write(path: Path, body: object) -> Path:
    path.write_bytes(orjson.dumps(body))
    return path


def _runs(bench: Bench) -> range:
    return range(max(1, bench.settings.runs))


# --- 1. non-streaming throughput ----------------------------------------------------------------------

THROUGHPUT_METRICS = [
    Metric("rps", "RPS", 0),
    Metric("p50_ms", "p50 ms", 2),
    Metric("p99_ms", "p99 ms", 2),
    Metric("errors", "errors", 0, compare=""),
]


def wrk_measure(
    bench: Bench,
    name: str,
    target: Target,
    body: Path,
    keys_file: Path | None = None,
    *,
    connections: int | None = None,
) -> Measurement:
    settings = bench.settings
    with bench.window() as window:
        result = run_wrk(
            target.origin + CHAT_PATH,
            keys_file=keys_file or target.keys_file,
            body_file=body,
            connections=connections or settings.connections,
            duration_s=settings.duration_s,
            wrk=settings.wrk,
            headers=target.headers,
        )
    figures = {
        "rps": result.rps,
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
        "errors": result.errors,
        "requests": result.requests,
    }
    return bench.measurement(
        name, figures, result.requests, window, result.loadgen_cpu_ms, gateway=target.gateway
    )


def non_streaming(bench: Bench) -> ScenarioResult:
    result = ScenarioResult(
        1,
        "non_streaming",
        f"Non-streaming chat, {bench.settings.connections} connections",
        "request",
        THROUGHPUT_METRICS,
        baseline="direct",
    )
    for _ in _runs(bench):
        result.runs.append([wrk_measure(bench, t.name, t, bench.body_plain) for t in bench.http_targets()])
    result.notes.append(
        f"wrk, 1 thread, {bench.settings.connections} keep-alive connections, closed loop; "
        f"{len(bench.env.keys)} keys of {len(bench.env.users)} users in rotation; "
        "errors = non-2xx + socket errors."
    )
    return result


# --- 2. streaming throughput and time to first byte ---------------------------------------------------


def streaming(bench: Bench) -> ScenarioResult:
    metrics = [
        Metric("rps", "streams/s", 0),
        Metric("ttfb_p50_ms", "TTFB p50 ms", 2),
        Metric("ttfb_p99_ms", "TTFB p99 ms", 2),
        Metric("p50_ms", "whole stream p50 ms", 2),
        Metric("p99_ms", "whole stream p99 ms", 2),
        Metric("errors", "errors", 0, compare=""),
    ]
    result = ScenarioResult(
        2,
        "streaming",
        f"Streaming chat ({UPSTREAM_CHUNKS} chunks), {bench.settings.connections} connections",
        "stream",
        metrics,
        baseline="direct",
    )
    wrk_connections = bench.settings.connections - TTFB_PROBE_CONNECTIONS
    for _ in _runs(bench):
        run = []
        for target in bench.http_targets():
            requests = bench.requests_for(target, bench.body_stream)
            with bench.window() as window:
                wrk_result, (replies, probe_errors) = httpclient.run(
                    _wrk_with_probe(bench, target, requests, wrk_connections)
                )
            ok = [r for r in replies if r.status == 200 and r.done]
            ttfbs = [r.ttfb_s * 1000 for r in ok]
            units = wrk_result.requests + len(replies)
            figures = {
                "rps": units / wrk_result.duration_s,
                "ttfb_p50_ms": percentile(ttfbs, 50),
                "ttfb_p99_ms": percentile(ttfbs, 99),
                "p50_ms": wrk_result.p50_ms,
                "p99_ms": wrk_result.p99_ms,
                "errors": wrk_result.errors + probe_errors + len(replies) - len(ok),
                "ttfb_samples": len(ttfbs),
            }
            run.append(
                bench.measurement(
                    target.name, figures, units, window, wrk_result.loadgen_cpu_ms, gateway=target.gateway
                )
            )
        result.runs.append(run)
    result.notes.append(
        f"{wrk_connections} wrk connections drive the load (wrk times whole streams); "
        f"{TTFB_PROBE_CONNECTIONS} more connections of the harness's own client measure the time from "
        f"sending a request to the first body byte, pausing {TTFB_PROBE_PAUSE_S * 1000:.0f} ms between "
        "requests so the probe's CPU stays small. loadgen CPU counts wrk only; the probe is in 'harness'."
    )
    return result


async def _wrk_with_probe(
    bench: Bench, target: Target, requests: list[bytes], wrk_connections: int
) -> tuple[WrkResult, tuple[list[httpclient.Reply], int]]:
    settings = bench.settings
    wrk_task = asyncio.to_thread(
        run_wrk,
        target.origin + CHAT_PATH,
        keys_file=target.keys_file,
        body_file=bench.body_stream,
        connections=wrk_connections,
        duration_s=settings.duration_s,
        wrk=settings.wrk,
        headers=target.headers,
    )
    probe_task = httpclient.probe(
        "127.0.0.1",
        target.port,
        requests,
        connections=TTFB_PROBE_CONNECTIONS,
        duration_s=settings.duration_s * 0.9,
        pause_s=TTFB_PROBE_PAUSE_S,
        start_delay_s=min(0.2, settings.duration_s / 10),  # wrk connects first
    )
    wrk_result, probe_result = await asyncio.gather(wrk_task, probe_task)
    return wrk_result, probe_result


# --- 3. added latency at a fixed rate -----------------------------------------------------------------


def fixed_rate(bench: Bench) -> ScenarioResult:
    rates = bench.settings.rates
    metrics = [
        Metric("rps", "achieved RPS", 0, compare=""),
        Metric("p50_ms", "p50 ms", 2, compare="delta"),
        Metric("p90_ms", "p90 ms", 2, compare="delta"),
        Metric("p99_ms", "p99 ms", 2, compare="delta"),
        Metric("max_ms", "max ms", 1, compare="delta"),
        Metric("ttfb_p50_ms", "TTFB p50 ms", 2, compare="delta"),
        Metric("errors", "errors", 0, compare=""),
    ]
    shown = " and ".join(f"{r:g}" for r in rates)
    result = ScenarioResult(
        3,
        "fixed_rate",
        f"Fixed rate ({shown} RPS), non-streaming and streaming: added latency",
        "request",
        metrics,
        baseline=f"direct @ {rates[0]:g}/s",
    )
    for _ in _runs(bench):
        run = []
        for rate in rates:
            for stream in (False, True):
                for target in bench.http_targets():
                    run.append(_at_rate(bench, target, rate, stream=stream))
        result.runs.append(run)
    result.notes.append(
        "Open loop: request i is due at start + i/rate whatever earlier answers did, on a pool of "
        "keep-alive connections that grows when all are busy, so slow answers never slow the sending "
        "(send lag p99 is in the JSON). Latency runs from writing the request to its last byte. Values in "
        "parentheses are the milliseconds added over direct at the same rate (stream rows: over direct "
        f"streams; {UPSTREAM_CHUNKS} chunks, no pacing, so TTFB is the figure that matters). The "
        "harness's own asyncio client (uvloop) sends the load and adds the same ~0.1-0.3 ms to both rows, "
        "which the difference cancels."
    )
    return result


def rate_row(target: str, rate: float, *, stream: bool) -> str:
    """The row name of ``target`` at ``rate`` in scenario 3."""
    return f"{target}{' stream' if stream else ''} @ {rate:g}/s"


def _at_rate(bench: Bench, target: Target, rate: float, *, stream: bool) -> Measurement:
    requests = bench.requests_for(target, bench.body_stream if stream else bench.body_plain)
    with bench.window() as window:
        outcome = httpclient.run(
            httpclient.fixed_rate(
                "127.0.0.1", target.port, requests, rate=rate, duration_s=bench.settings.duration_s
            )
        )
    latencies = [s * 1000 for s in outcome.latencies_s]
    figures = {
        "rps": len(latencies) / outcome.wall_s if outcome.wall_s else 0.0,
        "p50_ms": percentile(latencies, 50),
        "p90_ms": percentile(latencies, 90),
        "p99_ms": percentile(latencies, 99),
        "max_ms": max(latencies, default=0.0),
        "ttfb_p50_ms": percentile([s * 1000 for s in outcome.ttfb_s], 50),
        "ttfb_p99_ms": percentile([s * 1000 for s in outcome.ttfb_s], 99),
        "errors": outcome.errors + outcome.non_2xx,
        "connections": outcome.max_connections_used,
        "send_lag_p99_ms": percentile([s * 1000 for s in outcome.send_lag_s], 99),
    }
    measurement = bench.measurement(
        rate_row(target.name, rate, stream=stream),
        figures,
        len(latencies),
        window,
        0.0,
        gateway=target.gateway,
    )
    measurement.compare_to = rate_row("direct", rate, stream=stream)
    return measurement


# --- 4. many open streams through one relay process ---------------------------------------------------


def open_streams(bench: Bench) -> ScenarioResult:
    settings = bench.settings
    count = settings.streams
    ramp_s = count / settings.stream_open_rate
    # The relay opens streams slower than it is offered them: leave room for a 3x slower ramp.
    chunks = max(3, math.ceil(3 * ramp_s + settings.duration_s))
    metrics = [
        Metric("peak_open", "streams open at once", 0),
        Metric("completed", "completed", 0),
        Metric("failed", "failed", 0, compare=""),
        Metric("open_all_s", "time to open all s", 2, compare=""),
        Metric("ttfb_p99_ms", "TTFB p99 ms", 1),
        Metric("server_peak_mb", "server peak RSS MiB", 0),
        Metric("kib_per_stream", "KiB per open stream", 1),
    ]
    result = ScenarioResult(
        4,
        "open_streams",
        f"{count:,} concurrent slow streams (1 chunk/s, {chunks} chunks)",
        "stream",
        metrics,
        baseline="direct",
    )
    bench.env.upstream.configure(chunk_interval_ms=1000, chunks=chunks)
    try:
        for _ in _runs(bench):
            run = []
            for target in (bench.direct, bench.relaygate):
                run.append(_hold(bench, target, count, chunks))
            result.runs.append(run)
    finally:
        bench.env.upstream.configure(chunk_interval_ms=0, chunks=UPSTREAM_CHUNKS)
    result.notes.append(
        f"One connection per stream, opened at {settings.stream_open_rate:g}/s; each stream lasts {chunks} s "
        "(first chunk at once, then one per second). 'server' is the fake upstream for direct and the one "
        "relay process for relaygate; its RSS is sampled every 0.25 s. KiB per open stream = (peak RSS - "
        "RSS before) / peak open streams. Completed = ended with [DONE]."
    )
    return result


def _hold(bench: Bench, target: Target, count: int, chunks: int) -> Measurement:
    settings = bench.settings
    server = next(t for t in bench.tracked if t.name == target.server)
    before = server.memory_bytes()
    peak = before
    peak_open_at_peak = 0

    async def sample(open_now: int) -> None:
        nonlocal peak, peak_open_at_peak
        now = server.memory_bytes()
        if now > peak:
            peak = now
            peak_open_at_peak = open_now

    requests = bench.requests_for(target, bench.body_stream)
    timeout = count / settings.stream_open_rate + chunks + 60
    with bench.window() as window:
        outcome = httpclient.run(
            httpclient.hold_streams(
                "127.0.0.1",
                target.port,
                requests,
                count=count,
                open_rate=settings.stream_open_rate,
                timeout_s=timeout,
                sample=sample,
            )
        )
    open_peak = max(outcome.peak_open, 1)
    figures = {
        "peak_open": outcome.peak_open,
        "completed": outcome.completed,
        "failed": outcome.failed,
        "open_all_s": outcome.time_to_all_open_s or 0.0,
        "ttfb_p50_ms": percentile([s * 1000 for s in outcome.ttfb_s], 50),
        "ttfb_p99_ms": percentile([s * 1000 for s in outcome.ttfb_s], 99),
        "server_before_mb": before / 2**20,
        "server_peak_mb": peak / 2**20,
        "open_at_peak_rss": peak_open_at_peak,
        "kib_per_stream": (peak - before) / 1024 / open_peak,
    }
    return bench.measurement(
        target.name, figures, max(1, outcome.completed), window, 0.0, gateway=target.gateway
    )


# --- 5. logger ingest ---------------------------------------------------------------------------------


def logger_ingest(bench: Bench) -> ScenarioResult:
    metrics = [
        Metric("events_per_s", "events/s", 0),
        Metric("latency_p50_ms", "end-to-end p50 ms", 0, compare=""),
        Metric("latency_p99_ms", "end-to-end p99 ms", 0, compare=""),
        Metric("landed", "events stored", 0, compare=""),
    ]
    result = ScenarioResult(
        5,
        "logger_ingest",
        "Logger ingest: usage events from Kafka into PostgreSQL",
        "event",
        metrics,
        baseline="kafka consume only",
    )
    for _ in _runs(bench):
        result.runs.append(httpclient.run(_ingest_run(bench)))
    settings = bench.settings
    result.notes.append(
        f"Burst: {settings.ingest_burst:,} events produced as fast as aiokafka can, events/s = events / "
        "(last row's logged_at - first event's produce time). Paced: "
        f"{settings.ingest_rate:g} events/s for {settings.duration_s:g} s; end-to-end latency = logged_at_ms "
        "- occurred_at_ms of each row (the logger's batch window, RELAYGATE_BATCH_MAX_SECONDS=1 by "
        "default, dominates it). Baseline: the same burst read back by a bare aiokafka consumer, no "
        "database (the broker and client floor)."
    )
    return result


def _usage_event(model: str, index: int) -> UsageEvent:
    return UsageEvent(
        event_id=f"evt_{uuid.uuid4().hex}",
        occurred_at_ms=int(time.time() * 1000),
        key_id=f"key_bench{index % 100:03d}",
        user_id=f"usr_bench{index % 10:02d}",
        model=model,
        upstream_model=model,
        channel_id="chn_bench",
        endpoint="chat.completions",
        stream=False,
        status_code=200,
        usage=Usage(prompt_tokens=12, completion_tokens=20),
        cost_micros=52,
        price_id=1,
        reservation_id=f"req_bench{index}",
        latency_ms=3,
        ttfb_ms=2,
        upstream_ms=2,
        end_reason="done",
        attempts=1,
        client_ip="127.0.0.1",
    )


async def _ingest_run(bench: Bench) -> list[Measurement]:
    env, settings = bench.env, bench.settings
    producer = AIOKafkaProducer(bootstrap_servers=env.backing.kafka_bootstrap, acks="all", linger_ms=5)
    await producer.start()
    pg = await asyncpg.connect(env.db_primary)
    try:
        # Paced phase: latency at a rate the logger keeps up with.
        paced_model = f"bench-paced-{uuid.uuid4().hex[:8]}"
        since = int(time.time() * 1000) - 1000
        total = max(1, int(settings.ingest_rate * settings.duration_s))
        started = time.perf_counter()
        futures = []
        for index in range(total):
            due = started + index / settings.ingest_rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            futures.append(await producer.send(env.usage_topic, encode(_usage_event(paced_model, index))))
        await asyncio.gather(*futures)
        landed, _ = await _wait_rows(pg, paced_model, since, total, timeout_s=60)
        if landed < total:
            raise RuntimeError(f"the logger stored {landed} of {total} paced events within 60 s")
        paced = await _latencies(pg, paced_model, since)

        # Burst phase: throughput, with CPU accounting.
        burst_model = f"bench-burst-{uuid.uuid4().hex[:8]}"
        events = [_usage_event(burst_model, i) for i in range(settings.ingest_burst)]
        since = int(time.time() * 1000) - 1000
        with bench.window() as window:
            first_ms = time.time() * 1000
            futures = [await producer.send(env.usage_topic, encode(e)) for e in events]
            await asyncio.gather(*futures)
            landed, last_ms = await _wait_rows(pg, burst_model, since, len(events), timeout_s=120)
        if landed < len(events):
            raise RuntimeError(f"the logger stored {landed} of {len(events)} burst events within 120 s")
        burst = await _latencies(pg, burst_model, since)
        elapsed_s = max((last_ms - first_ms) / 1000, 1e-3)
        logger = bench.measurement(
            "relaygate logger",
            {
                "events_per_s": landed / elapsed_s,
                "latency_p50_ms": paced[0],
                "latency_p99_ms": paced[1],
                "burst_latency_p50_ms": burst[0],
                "burst_latency_p99_ms": burst[1],
                "landed": landed,
            },
            landed,
            window,
            0.0,
        )

        # Baseline: the same burst read by a bare consumer from a scratch topic.
        baseline = await _kafka_floor(bench, producer, events)
    finally:
        await pg.close()
        await producer.stop()
    return [baseline, logger]


async def _wait_rows(
    pg: asyncpg.Connection, model: str, since_ms: int, expected: int, *, timeout_s: float
) -> tuple[int, float]:
    """Poll until ``expected`` rows of ``model`` exist; return (rows, newest logged_at_ms)."""
    deadline = time.monotonic() + timeout_s
    query = (
        "SELECT count(*), coalesce(max(logged_at_ms), 0) FROM request_logs "
        "WHERE occurred_at_ms >= $1 AND model = $2"
    )
    while True:
        row = await pg.fetchrow(query, since_ms, model)
        assert row is not None
        count, last = int(row[0]), float(row[1])
        if count >= expected or time.monotonic() > deadline:
            return count, last
        await asyncio.sleep(0.1)


async def _latencies(pg: asyncpg.Connection, model: str, since_ms: int) -> tuple[float, float]:
    row = await pg.fetchrow(
        "SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY logged_at_ms - occurred_at_ms), "
        "percentile_disc(0.99) WITHIN GROUP (ORDER BY logged_at_ms - occurred_at_ms) "
        "FROM request_logs WHERE occurred_at_ms >= $1 AND model = $2",
        since_ms,
        model,
    )
    if row is None or row[0] is None:
        return 0.0, 0.0
    return float(row[0]), float(row[1])


async def _kafka_floor(bench: Bench, producer: AIOKafkaProducer, events: list[UsageEvent]) -> Measurement:
    topic = f"{bench.env.topic_prefix}bench.floor.{uuid.uuid4().hex[:6]}"
    payloads = [encode(e) for e in events]
    futures = [await producer.send(topic, p) for p in payloads]
    await asyncio.gather(*futures)
    partitions = [TopicPartition(topic, p) for p in await producer.partitions_for(topic)]
    consumer = AIOKafkaConsumer(bootstrap_servers=bench.env.backing.kafka_bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        received = 0
        deadline = time.monotonic() + 60
        with bench.window() as window:
            started = time.perf_counter()
            while received < len(payloads) and time.monotonic() < deadline:
                batches = await consumer.getmany(timeout_ms=200, max_records=5000)
                for records in batches.values():
                    for record in records:
                        if record.value is not None:
                            UsageEvent.FromString(record.value)
                            received += 1
            elapsed = time.perf_counter() - started
    finally:
        await consumer.stop()
    return bench.measurement(
        "kafka consume only",
        {"events_per_s": received / max(elapsed, 1e-3), "landed": 0},
        max(1, received),
        window,
        0.0,
        gateway="",
    )


# --- 6. quota reserve + settle ------------------------------------------------------------------------


def quota_pairs(bench: Bench) -> ScenarioResult:
    metrics = [
        Metric("ops_per_s", "pairs (or calls)/s", 0),
        Metric("p50_ms", "p50 ms", 2),
        Metric("p99_ms", "p99 ms", 2),
        Metric("errors", "errors", 0, compare=""),
    ]
    result = ScenarioResult(
        6,
        "quota",
        f"Quota: Reserve + Settle pairs over gRPC, {bench.settings.quota_tasks} concurrent tasks",
        "pair",
        metrics,
        baseline="gRPC health check",
    )
    for _ in _runs(bench):
        result.runs.append(httpclient.run(_quota_run(bench)))
    result.notes.append(
        "One harness process calls the quota process directly (no relay): each task reserves "
        "(12 prompt + 20 output tokens) and settles the actual usage, over "
        f"{len(bench.env.users)} funded users. Baseline: the standard gRPC health Check against the same "
        "quota process with the same client and concurrency, i.e. the floor of one unary call; the client "
        "(grpc.aio in Python) is itself CPU-bound near ~3k calls/s on this machine (its CPU is 'harness')."
    )
    return result


async def _quota_run(bench: Bench) -> list[Measurement]:
    settings = bench.settings
    grpc_channel = bench.env.stack.client("quota")
    quota = QuotaServiceStub(grpc_channel)
    health = health_pb2_grpc.HealthStub(grpc_channel)
    users = bench.env.users
    try:

        async def floor_call(_: int) -> None:
            await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)

        async def pair(index: int) -> None:
            reservation_id = f"req_bench{uuid.uuid4().hex}"
            await quota.Reserve(
                quota_pb2.ReserveRequest(
                    reservation_id=reservation_id,
                    key_id=f"key_bench{index % 100:03d}",
                    user_id=users[index % len(users)],
                    model=MODEL,
                    prompt_tokens=12,
                    max_output_tokens=20,
                ),
                timeout=5,
            )
            await quota.Settle(
                quota_pb2.SettleRequest(
                    reservation_id=reservation_id, usage=Usage(prompt_tokens=12, completion_tokens=20)
                ),
                timeout=5,
            )

        measurements = []
        for name, operation in (("gRPC health check", floor_call), ("reserve + settle", pair)):
            with bench.window() as window:
                latencies, errors = await _closed_loop(operation, settings.quota_tasks, settings.duration_s)
            figures = {
                "ops_per_s": len(latencies) / window.wall_s,
                "p50_ms": percentile(latencies, 50),
                "p99_ms": percentile(latencies, 99),
                "errors": errors,
            }
            measurements.append(bench.measurement(name, figures, max(1, len(latencies)), window, 0.0))
        return measurements
    finally:
        await grpc_channel.close(None)


async def _closed_loop(
    operation: Callable[[int], object], tasks: int, duration_s: float
) -> tuple[list[float], int]:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + duration_s
    counter = 0

    async def worker() -> None:
        nonlocal errors, counter
        while time.perf_counter() < deadline:
            counter += 1
            started = time.perf_counter()
            try:
                await operation(counter)  # type: ignore[misc]
            except grpc.aio.AioRpcError:
                errors += 1
                continue
            latencies.append((time.perf_counter() - started) * 1000)

    await asyncio.gather(*(worker() for _ in range(tasks)))
    return latencies, errors


# --- 7. growth: keys and channels ---------------------------------------------------------------------

# The relay trusts a verified key this long while it follows auth's invalidations (the bench's stack runs
# with the default); a many-keys row starting later than this after its keys were touched would measure
# their expiry, not the steady state, so they are touched again first.
KEY_CACHE_TTL_S = float(RelaySettings.model_fields["auth_cache_ttl_s"].default)
KEY_PASS_TIMEOUT_S = 900.0  # a pass over every key, at worst (10,000 cold keys take about a minute)


def growth(bench: Bench) -> ScenarioResult:
    settings = bench.settings
    base_keys = len(bench.env.keys)
    many = settings.growth_keys
    channels = settings.growth_channels
    result = ScenarioResult(
        7,
        "growth",
        f"Growth: scenario 1 with {base_keys} vs {many:,} keys and 1 vs {channels} channels",
        "request",
        THROUGHPUT_METRICS,
        baseline="direct",
    )
    started = time.perf_counter()
    extra_keys = httpclient.run(bench.env.create_keys(max(0, many - base_keys)))
    keys_s = time.perf_counter() - started
    many_keys = bench.env.keys + extra_keys
    many_file = bench.env.keys_file(many_keys, "keys-growth.txt")
    few = f"{base_keys} keys, 1 channel"
    cold = f"{many:,} keys, 1 channel, first use"
    lots = f"{many:,} keys, 1 channel"
    few_ch = f"{base_keys} keys, {channels} channels"
    lots_ch = f"{many:,} keys, {channels} channels"
    touched_at = -math.inf  # when the last pass over every key started (monotonic)
    rewarmed = 0

    def warm_row(name: str) -> Measurement:
        nonlocal touched_at, rewarmed
        if time.monotonic() + settings.duration_s + 5 >= touched_at + KEY_CACHE_TTL_S:
            touched_at = time.monotonic()
            _each_key_once(bench, many_keys)
            rewarmed += 1
        return wrk_measure(bench, name, bench.relaygate, bench.body_plain, many_file)

    for index in _runs(bench):
        run = [
            wrk_measure(bench, "direct", bench.direct, bench.body_plain),
            wrk_measure(bench, few, bench.relaygate, bench.body_plain),
        ]
        if index == 0:
            touched_at = time.monotonic()
            run.append(_first_use(bench, cold, many_keys))
        run.append(warm_row(lots))
        result.runs.append(run)
    started = time.perf_counter()
    added = httpclient.run(bench.env.add_channels(max(0, channels - 1)))
    channels_s = time.perf_counter() - started
    time.sleep(1.5)  # every relay picks up the new table (it also refreshes on each admin change)
    try:
        for run in result.runs:
            run.append(wrk_measure(bench, few_ch, bench.relaygate, bench.body_plain))
            run.append(warm_row(lots_ch))
    finally:
        httpclient.run(bench.env.delete_channels(added))
    result.extra = {
        "keys_created": len(extra_keys),
        "keys_seconds": round(keys_s, 1),
        "few_keys_row": few,
        "many_keys_row": lots,
        "cold_keys_row": cold,
        "key_passes_repeated": rewarmed,
    }
    result.notes.append(
        f"{many:,}-key rows rotate through all {many:,} keys (spread over the same "
        f"{len(bench.env.users)} users), every one of them verified by the relay within its auth cache TTL "
        f"({KEY_CACHE_TTL_S:g} s while it follows auth's invalidations): the steady state of a deployment "
        f"whose {many:,} keys are each used at least once per TTL. The keys are sent through the relay once "
        "each before these rows (and again, unmeasured, when a row would start later than a TTL after that "
        f"pass: {rewarmed} time(s) in this run); the growth target reads the warm '{lots}' row. "
        f"'{cold}' is that first pass, measured: every key's first request (auth gRPC + Redis/DB lookup, "
        "and the key's first admission), informational only. "
        f"{channels}-channel rows: {channels} enabled channels all serve the benchmarked model with equal "
        f"weights (same fake upstream), so every request orders {channels} candidates."
    )
    result.notes.append(
        f"Setup, not measured: {len(extra_keys):,} keys created through auth's CreateKey RPC in "
        f"{keys_s:.1f} s "
        f"({len(extra_keys) / max(keys_s, 1e-3):,.0f}/s, 32 concurrent); {len(added)} channels added "
        f"through the admin API in {channels_s:.1f} s."
    )
    return result


def _first_use(bench: Bench, name: str, keys: list[str]) -> Measurement:
    """Row ``name``: one request per key through the relay (every key's first), on the scenario's
    connection count."""
    with bench.window() as window:
        replies, errors = _each_key_once(bench, keys)
    latencies = [reply.total_s * 1000 for reply in replies]
    figures = {
        "rps": len(replies) / window.wall_s,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "errors": errors + sum(1 for reply in replies if reply.status != 200),
        "requests": len(replies),
    }
    return bench.measurement(name, figures, max(1, len(replies)), window, 0.0)


def _each_key_once(bench: Bench, keys: list[str]) -> tuple[list[httpclient.Reply], int]:
    raw = bench.body_plain.read_bytes()
    port = bench.relaygate.port
    requests = [httpclient.build_request("127.0.0.1", port, CHAT_PATH, raw, key) for key in keys]
    return httpclient.run(_send_each(port, requests, bench.settings.connections, KEY_PASS_TIMEOUT_S))


async def _send_each(
    port: int, requests: list[bytes], connections: int, timeout_s: float
) -> tuple[list[httpclient.Reply], int]:
    """Send every request once over ``connections`` keep-alive connections; stops at ``timeout_s``."""
    pending = iter(requests)
    replies: list[httpclient.Reply] = []
    errors = 0
    deadline = time.monotonic() + timeout_s

    async def worker() -> None:
        nonlocal errors
        connection: httpclient.Connection | None = None
        for request in pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"a pass over {len(requests):,} keys took over {timeout_s:.0f} s")
            try:
                if connection is None or not connection.reusable:
                    connection = await httpclient.Connection.open("127.0.0.1", port)
                replies.append(await asyncio.wait_for(connection.send(request), 30))
            except (OSError, TimeoutError, asyncio.IncompleteReadError, httpclient.ProtocolError, ValueError):
                errors += 1
                if connection is not None:
                    connection.close()
                connection = None
        if connection is not None:
            connection.close()

    await asyncio.gather(*(worker() for _ in range(connections)))
    return replies, errors


SCENARIOS: dict[int, Callable[[Bench], ScenarioResult]] = {
    1: non_streaming,
    2: streaming,
    3: fixed_rate,
    4: open_streams,
    5: logger_ingest,
    6: quota_pairs,
    7: growth,
}


# Run only when named in --scenarios: 10 restarts the services twice per run; 12 idles a minute per run.
OPT_IN: frozenset[int] = frozenset({10, 12})


def _register_more() -> None:
    # Scenarios 8 to 11 live in modules of their own, which import the helpers above.
    from bench.auth_verify import auth_verify
    from bench.grpc_front import grpc_front
    from bench.paced import paced_streams
    from bench.performance_view import performance_view
    from bench.tracing_overhead import tracing_overhead

    SCENARIOS[8] = auth_verify
    SCENARIOS[9] = paced_streams
    SCENARIOS[10] = tracing_overhead
    SCENARIOS[11] = grpc_front
    SCENARIOS[12] = performance_view


_register_more()
