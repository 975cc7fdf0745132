"""Scenario 10: what tracing costs, in CPU per request, with spans exported.

The same closed-loop load (scenario 1's plain requests and scenario 2's streams) is measured on
relaygate: as deployed (tracing off: no ``OTEL_*`` variables), then with the four services restarted
exporting spans over OTLP/HTTP to a sink in this process that reads and discards them: every
request's, then one in ten's (the ratio sampler). The notes give the gateway CPU difference per
request against the rows without tracing, and the volume exported. The services are restarted once
more without tracing at the end, so later scenarios measure the deployment as before.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from bench import httpclient
from bench.report import Measurement, ScenarioResult
from bench.scenarios import THROUGHPUT_METRICS, Bench, _runs, wrk_measure

__all__ = ["tracing_overhead"]

_OTEL_PREFIX = "OTEL_"


class _DiscardingSink:
    """An OTLP/HTTP endpoint that accepts every export, counts it and keeps nothing."""

    def __init__(self) -> None:
        self.exports = 0
        self.bytes = 0
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                size = int(self.headers.get("content-length", "0"))
                self.rfile.read(size)
                sink.exports += 1
                sink.bytes += size
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-sink", daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @contextlib.contextmanager
    def running(self) -> Iterator[_DiscardingSink]:
        self._thread.start()
        try:
            yield self
        finally:
            self._server.shutdown()
            self._server.server_close()


def _restart(bench: Bench, otel: dict[str, str]) -> None:
    """Restart the four services with ``otel`` as their only ``OTEL_*`` settings, and warm them."""
    env = bench.env
    stack = env.stack
    stack.stop()
    for name in [name for name in stack.env if name.startswith(_OTEL_PREFIX)]:
        del stack.env[name]
    stack.env.update(otel)
    stack.start()
    env.tracked = env._find_processes()
    httpclient.run(env._wait_ready())
    bench.warm_up()


# What each tracing row runs with (beside the sink's endpoint), after the rows without tracing.
_MODES: dict[str, dict[str, str]] = {
    "tracing on": {},
    "tracing on, 10 % sampled": {
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.1",
    },
}


def tracing_overhead(bench: Bench) -> ScenarioResult:
    result = ScenarioResult(
        10,
        "tracing_overhead",
        f"Tracing on vs off, {bench.settings.connections} connections",
        "request",
        THROUGHPUT_METRICS,
        baseline="plain, tracing off",
    )
    target = bench.relaygate
    bodies = {"plain": bench.body_plain, "stream": bench.body_stream}
    sink = _DiscardingSink()
    with sink.running():
        for _ in _runs(bench):
            run: list[Measurement] = []
            for kind, body in bodies.items():
                measured = wrk_measure(bench, f"{kind}, tracing off", target, body)
                # Each row is compared with the same requests without tracing (this one with none).
                measured.compare_to = measured.target
                run.append(measured)
            try:
                for mode, otel in _MODES.items():
                    _restart(bench, {"OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint, **otel})
                    for kind, body in bodies.items():
                        measured = wrk_measure(bench, f"{kind}, {mode}", target, body)
                        measured.compare_to = f"{kind}, tracing off"
                        run.append(measured)
            finally:
                _restart(bench, {})
            result.runs.append(run)
    medians = {m.target: m for m in result.medians()}
    for kind in bodies:
        off = medians.get(f"{kind}, tracing off")
        before = off.gateway_cpu_per_unit() if off is not None else None
        for mode in _MODES:
            on = medians.get(f"{kind}, {mode}")
            after = on.gateway_cpu_per_unit() if on is not None else None
            if before is None or after is None:
                continue
            difference = after - before
            share = difference / before * 100 if before else 0.0
            result.extra[f"{kind}, {mode}: cpu_ms_difference"] = round(difference, 4)
            result.notes.append(
                f"{kind}, {mode}: {difference:+.3f} ms of gateway CPU per request ({share:+.1f} %; "
                f"{before:.3f} → {after:.3f} ms, relay + auth + quota + logger)."
            )
    result.extra["exports"] = sink.exports
    result.extra["exported_bytes"] = sink.bytes
    result.notes.append(
        "Tracing on: OTEL_EXPORTER_OTLP_ENDPOINT set for all four services (default sampler: every "
        "request; batch export every 5 s), spans posted over OTLP/HTTP to a local sink that discards them "
        f"({sink.exports} exports, {sink.bytes / 1e6:.1f} MB in all). 10 % sampled: "
        "OTEL_TRACES_SAMPLER=parentbased_traceidratio, OTEL_TRACES_SAMPLER_ARG=0.1. Tracing off: no "
        "OTEL_* variables, as deployed."
    )
    return result
