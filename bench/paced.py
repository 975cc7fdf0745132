"""Scenario 9: streams paced like a model (100 chunks, 2 ms apart), CPU per stream.

Scenario 2 streams as fast as the upstream can write, which measures a gateway's throughput; a model
writes a token every few milliseconds, so a real stream spends most of its life waiting and each chunk
crosses the gateway on its own. What matters then is what a whole stream costs the gateway.
"""

from __future__ import annotations

from bench.env import MODEL, UPSTREAM_CHUNKS
from bench.report import Metric, ScenarioResult
from bench.scenarios import PROMPT, Bench, _runs, _write, wrk_measure

__all__ = ["PACED_CHUNKS", "PACED_INTERVAL_MS", "paced_streams"]

PACED_CHUNKS = 100
PACED_INTERVAL_MS = 2


def paced_streams(bench: Bench) -> ScenarioResult:
    settings = bench.settings
    connections = settings.paced_connections
    metrics = [
        Metric("rps", "streams/s", 1),
        Metric("p50_ms", "whole stream p50 ms", 1),
        Metric("p99_ms", "whole stream p99 ms", 1),
        Metric("errors", "errors", 0, compare=""),
    ]
    result = ScenarioResult(
        9,
        "paced_streams",
        f"Paced streams ({PACED_CHUNKS} chunks, {PACED_INTERVAL_MS} ms apart), {connections} connections",
        "stream",
        metrics,
        baseline="direct",
    )
    # max_tokens caps the fake upstream's words, so it must allow all of them.
    body = _write(
        bench.env.work_dir / "body-paced.json",
        {"model": MODEL, "messages": PROMPT, "max_tokens": PACED_CHUNKS, "stream": True},
    )
    bench.env.upstream.configure(chunk_interval_ms=PACED_INTERVAL_MS, chunks=PACED_CHUNKS)
    try:
        for _ in _runs(bench):
            result.runs.append(
                [
                    wrk_measure(bench, target.name, target, body, connections=connections)
                    for target in bench.http_targets()
                ]
            )
    finally:
        bench.env.upstream.configure(chunk_interval_ms=0, chunks=UPSTREAM_CHUNKS)
    result.notes.append(
        f"wrk, {connections} connections, closed loop, one stream after another on each; the fake "
        f"upstream waits {PACED_INTERVAL_MS} ms before each of its {PACED_CHUNKS} content chunks, so a "
        f"stream lasts at least {PACED_CHUNKS * PACED_INTERVAL_MS} ms and the gateway relays each chunk "
        "on its own. The figure to read is CPU per stream (gateway column; the deployment column adds "
        "PostgreSQL, Redis and the broker for relaygate)."
    )
    return result
