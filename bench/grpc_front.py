"""Scenario 11: the relay's gRPC front next to its HTTP front, on the same stack.

* **non-streaming**: the same chat request (20 words) in a closed loop for the scenario's duration,
  over HTTP by wrk and over gRPC by this module's grpc.aio load generator (several channels, one call
  after another on each of ``connections`` workers, every call with a key of the rotation in its
  metadata): requests per second, latency, and the relay's CPU per request;
* **streaming**: time to the first chunk, a few probes with pauses between streams, as scenario 2's
  probe measures HTTP: the harness's HTTP client waits for the first body byte, the gRPC probe for
  the first ``ChatCompletionChunk``.

Both fronts go through the same pipeline (admission, upstream, settlement, usage event), so the
difference is the framing: HTTP/1.1 + JSON bytes passed through, against HTTP/2 + TLS + protobuf
(each answer is parsed and re-encoded). The gRPC load generator runs in the harness, on the same two
cores as everything else: in Python it is slower per call than wrk, so its figures are a floor.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager

import grpc

from bench import httpclient
from bench.env import MODEL
from bench.report import Measurement, Metric, ScenarioResult, percentile
from bench.scenarios import PROMPT, Bench, _runs, wrk_measure
from services.common.pb.relaygate.relay.v1 import inference_pb2 as pb
from services.common.pb.relaygate.relay.v1 import inference_pb2_grpc as pb_grpc
from services.common.tls import RELAY, server_name

__all__ = ["grpc_front"]

# Channels the load is spread over (each one HTTP/2 connection, multiplexing its workers' calls).
CHANNELS = 4
PROBE_CONNECTIONS = 5
PROBE_PAUSE_S = 0.01
CALL_TIMEOUT_S = 30.0


def _request(*, max_tokens: int = 20) -> pb.ChatCompletionRequest:
    return pb.ChatCompletionRequest(
        model=MODEL,
        messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in PROMPT],
        max_tokens=max_tokens,
    )


@asynccontextmanager
async def _stubs(bench: Bench, count: int) -> AsyncIterator[list[pb_grpc.InferenceServiceAsyncStub]]:
    stack = bench.env.stack
    certs = stack.certs
    if certs is None or stack.env.get("RELAYGATE_GRPC_TLS", "").lower() in ("off", "false", "0", "no"):
        channels = [grpc.aio.insecure_channel(stack.relay_grpc_address) for _ in range(count)]
    else:
        credentials = grpc.ssl_channel_credentials(root_certificates=certs.tls(RELAY).ca)
        # Distinct channels get distinct connections only when their arguments differ.
        channels = [
            grpc.aio.secure_channel(
                stack.relay_grpc_address,
                credentials,
                options=[("grpc.ssl_target_name_override", server_name(RELAY)), ("bench.channel", i)],
            )
            for i in range(count)
        ]
    try:
        yield [pb_grpc.InferenceServiceStub(c) for c in channels]
    finally:
        for c in channels:
            await c.close(None)


def _metadata(keys: Sequence[str]) -> Iterator[tuple[tuple[str, str], ...]]:
    return itertools.cycle([(("authorization", f"Bearer {key}"),) for key in keys])


async def _closed_loop(bench: Bench, workers: int, duration_s: float) -> tuple[list[float], int]:
    """Latencies (ms) of successful unary calls, and the failures, over ``duration_s``."""
    latencies: list[float] = []
    errors = 0
    request = _request()
    metadata = _metadata(bench.env.keys)
    async with _stubs(bench, CHANNELS) as stubs:
        deadline = time.perf_counter() + duration_s

        async def worker(stub: pb_grpc.InferenceServiceAsyncStub) -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    await stub.CreateChatCompletion(request, metadata=next(metadata), timeout=CALL_TIMEOUT_S)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                latencies.append((time.perf_counter() - started) * 1000)

        await asyncio.gather(*(worker(stubs[i % len(stubs)]) for i in range(workers)))
    return latencies, errors


async def _stream_probe(bench: Bench, duration_s: float) -> tuple[list[float], int, int]:
    """Times to the first chunk (ms) of complete streams, the failures, and the streams started."""
    ttfbs: list[float] = []
    errors = 0
    started_streams = 0
    request = _request()
    metadata = _metadata(bench.env.keys)
    async with _stubs(bench, 1) as (stub,):
        deadline = time.perf_counter() + duration_s

        async def loop() -> None:
            nonlocal errors, started_streams
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                started_streams += 1
                first = 0.0
                try:
                    async for _ in stub.StreamChatCompletion(
                        request, metadata=next(metadata), timeout=CALL_TIMEOUT_S
                    ):
                        first = first or time.perf_counter() - started
                except grpc.aio.AioRpcError:
                    errors += 1
                else:
                    ttfbs.append(first * 1000)
                await asyncio.sleep(PROBE_PAUSE_S)

        await asyncio.gather(*(loop() for _ in range(PROBE_CONNECTIONS)))
    return ttfbs, errors, started_streams


def _unary_row(bench: Bench) -> Measurement:
    settings = bench.settings
    with bench.window() as window:
        latencies, errors = httpclient.run(_closed_loop(bench, settings.connections, settings.duration_s))
    figures = {
        "rps": len(latencies) / window.wall_s if window.wall_s else 0.0,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "errors": errors,
        "requests": len(latencies),
    }
    # The load generator is this process: its CPU is the harness's.
    return bench.measurement(
        "relaygate grpc", figures, len(latencies), window, window.cpu_ms.get("harness", 0.0)
    )


def _http_probe_row(bench: Bench) -> Measurement:
    requests = bench.requests_for(bench.relaygate, bench.body_stream)
    with bench.window() as window:
        replies, errors = httpclient.run(
            httpclient.probe(
                "127.0.0.1",
                bench.relaygate.port,
                requests,
                connections=PROBE_CONNECTIONS,
                duration_s=bench.settings.duration_s,
                pause_s=PROBE_PAUSE_S,
            )
        )
    ok = [r for r in replies if r.status == 200 and r.done]
    ttfbs = [r.ttfb_s * 1000 for r in ok]
    figures = {
        "rps": len(ok) / window.wall_s if window.wall_s else 0.0,
        "ttfb_p50_ms": percentile(ttfbs, 50),
        "ttfb_p99_ms": percentile(ttfbs, 99),
        "errors": errors + len(replies) - len(ok),
    }
    return bench.measurement("relaygate http stream", figures, len(ok), window, 0.0)


def _grpc_probe_row(bench: Bench) -> Measurement:
    with bench.window() as window:
        ttfbs, errors, _ = httpclient.run(_stream_probe(bench, bench.settings.duration_s))
    figures = {
        "rps": len(ttfbs) / window.wall_s if window.wall_s else 0.0,
        "ttfb_p50_ms": percentile(ttfbs, 50),
        "ttfb_p99_ms": percentile(ttfbs, 99),
        "errors": errors,
    }
    measured = bench.measurement("relaygate grpc stream", figures, len(ttfbs), window, 0.0)
    measured.compare_to = "relaygate http stream"
    return measured


def grpc_front(bench: Bench) -> ScenarioResult:
    connections = bench.settings.connections
    metrics = [
        Metric("rps", "RPS (streams/s for stream rows)", 0),
        Metric("p50_ms", "p50 ms", 2),
        Metric("p99_ms", "p99 ms", 2),
        Metric("ttfb_p50_ms", "TTFB p50 ms", 2),
        Metric("ttfb_p99_ms", "TTFB p99 ms", 2),
        Metric("errors", "errors", 0, compare=""),
    ]
    result = ScenarioResult(
        11,
        "grpc_front",
        f"gRPC front next to HTTP: non-streaming chat ({connections} connections / workers) and "
        f"stream time to first chunk ({PROBE_CONNECTIONS} probes)",
        "request",
        metrics,
        baseline="relaygate http",
    )
    for _ in _runs(bench):
        http = wrk_measure(bench, "relaygate http", bench.relaygate, bench.body_plain)
        result.runs.append([http, _unary_row(bench), _http_probe_row(bench), _grpc_probe_row(bench)])
    result.notes.append(
        f"Non-streaming: wrk (HTTP/1.1, {connections} keep-alive connections) against the harness's "
        f"grpc.aio client ({connections} workers over {CHANNELS} TLS channels), both closed loops on "
        "the same keys; the gRPC row's loadgen CPU is the harness's own. Streams: "
        f"{PROBE_CONNECTIONS} probes one stream after another with {PROBE_PAUSE_S * 1000:.0f} ms "
        "pauses; the gRPC stream row is compared with the HTTP stream row. CPU per unit is per request "
        "or per stream of the row. See bench/grpc_front.py."
    )
    return result
