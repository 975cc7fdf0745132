"""Scenario 8: key verification, through auth over gRPC and through the relay's in-process cache.

Every relay request starts here, so all three layers matter: the relay answers most requests from its
cache (no RPC at all); on a miss it asks auth, which answers from its Redis principal cache (warm) or,
for a key it has not verified within its cache TTL, from the database (cold).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench import httpclient
from bench.env import MODEL
from bench.procstat import CpuWindow
from bench.report import Measurement, Metric, ScenarioResult, percentile
from bench.scenarios import Bench, _closed_loop, _runs
from services.common.pb.relaygate.auth.v1.auth_pb2 import VerifyKeyRequest
from services.common.pb.relaygate.auth.v1.auth_pb2_grpc import AuthServiceStub
from services.relay.pipeline.principals import Authenticator


def auth_verify(bench: Bench) -> ScenarioResult:
    metrics = [
        Metric("ops_per_s", "verifications/s", 0),
        Metric("p50_ms", "p50 ms", 3),
        Metric("p99_ms", "p99 ms", 3),
        Metric("errors", "errors", 0, compare=""),
    ]
    result = ScenarioResult(
        8,
        "auth",
        f"Key verification: auth over gRPC ({bench.settings.quota_tasks} tasks) and the relay's cache",
        "verification",
        metrics,
        baseline="gRPC health check",
    )
    for _ in _runs(bench):
        result.runs.append(httpclient.run(_auth_run(bench)))
    result.notes.append(
        "gRPC rows: one harness process calls the auth process directly with the same client and "
        f"concurrency as scenario 6, over {bench.settings.auth_keys:,} keys created for this scenario. "
        f"'{COLD}' verifies each of them once, first: auth's Redis cache misses, so auth reads the key and "
        "its user on the replica, checks the secret's HMAC and fills the cache (a relay's first request "
        f"with a key). '{WARM}' then verifies them round and round from auth's Redis cache (a relay cache "
        "miss for a key auth has seen). 'relay cache hit' runs the relay's own Authenticator in the "
        "harness process: a hit hashes the key, looks it up, parses the principal and re-checks its "
        "scopes, with no RPC."
    )
    return result


COLD = "VerifyKey over gRPC, cold (database)"
WARM = "VerifyKey over gRPC"


async def _auth_run(bench: Bench) -> list[Measurement]:
    settings = bench.settings
    keys = await bench.env.create_keys(settings.auth_keys)
    grpc_channel = bench.env.stack.client("auth")
    auth = AuthServiceStub(grpc_channel)
    health = health_pb2_grpc.HealthStub(grpc_channel)
    try:

        async def floor_call(_: int) -> None:
            await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)

        async def verify(index: int) -> None:
            response = await auth.VerifyKey(
                VerifyKeyRequest(api_key=keys[index % len(keys)], model=MODEL, client_ip="127.0.0.1"),
                timeout=5,
            )
            if response.deny_reason:
                raise RuntimeError(f"bench key refused: {response.message}")

        measurements = []
        with bench.window() as window:
            latencies, errors = await _closed_loop(floor_call, settings.quota_tasks, settings.duration_s)
        measurements.append(_measurement(bench, "gRPC health check", latencies, errors, window))
        with bench.window() as window:
            latencies, errors = await _each_once(verify, len(keys), settings.quota_tasks)
        measurements.append(_measurement(bench, COLD, latencies, errors, window))
        with bench.window() as window:
            latencies, errors = await _closed_loop(verify, settings.quota_tasks, settings.duration_s)
        measurements.append(_measurement(bench, WARM, latencies, errors, window))

        authenticator = Authenticator(
            auth, ttl_s=3600, fallback_ttl_s=3600, max_entries=len(keys), rpc_timeout_s=5
        )
        for key in keys:  # warm: one RPC per key, then every call is a hit
            await authenticator.authenticate(key, model=MODEL, client_ip="127.0.0.1")
        latencies = []
        with bench.window() as window:
            deadline = time.perf_counter() + settings.duration_s
            index = 0
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                await authenticator.authenticate(keys[index % len(keys)], model=MODEL, client_ip="127.0.0.1")
                latencies.append((time.perf_counter() - started) * 1000)
                index += 1
        measurements.append(_measurement(bench, "relay cache hit", latencies, 0, window))
        return measurements
    finally:
        await grpc_channel.close(None)


async def _each_once(
    operation: Callable[[int], Awaitable[None]], count: int, tasks: int
) -> tuple[list[float], int]:
    """``operation(i)`` once for every ``i`` below ``count``, ``tasks`` at a time."""
    latencies: list[float] = []
    errors = 0
    pending = iter(range(count))

    async def worker() -> None:
        nonlocal errors
        for index in pending:
            started = time.perf_counter()
            try:
                await operation(index)
            except grpc.aio.AioRpcError:
                errors += 1
                continue
            latencies.append((time.perf_counter() - started) * 1000)

    await asyncio.gather(*(worker() for _ in range(tasks)))
    return latencies, errors


def _measurement(
    bench: Bench, name: str, latencies: list[float], errors: int, window: CpuWindow
) -> Measurement:
    figures = {
        "ops_per_s": len(latencies) / window.wall_s,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "errors": errors,
    }
    return bench.measurement(name, figures, max(1, len(latencies)), window, 0.0)
