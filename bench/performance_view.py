"""Scenario 12: the live performance view (``GET /admin/v1/performance``) against bench's own figures,
and what polling it every second costs the relay.

Per run: the relay idles until its 1-minute window is empty (about a minute), and meanwhile its CPU is
read over two equal spans, without and then with the view polled once a second; the difference is the
polling's cost (the snapshot each relay posts every second is in both). Then, with the view polled
every second, the harness sends plain requests at a fixed rate below saturation, and the view read
right after holds exactly that load in its 1-minute window: its request count, rate (over the load's
duration) and latency percentiles are set next to the harness's. That paced phase runs twice, each in
a 1-minute window of its own: with the fake upstream answering at once (the relay's latency is then
its own few milliseconds, and the loopback and the client's parsing are a large share of it) and
answering after 20 ms (still far quicker than any model; the same absolute gap, a small share). Then
scenario 1's saturating load (wrk, closed loop) runs, and its count and rate are compared by difference.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx

from bench.procstat import CpuWindow
from bench.report import Measurement, Metric, ScenarioResult
from bench.scenarios import Bench, _at_rate, _runs, wrk_measure

__all__ = ["performance_view"]

PATH = "/admin/v1/performance"
IDLE_SPAN_S = 30.0
# Below saturation, so that the relay's own timing and the client's differ by the loopback only.
PACED_RATE = 200.0
# The fake upstream's answer delay in each paced phase, and the phase's row name.
PACED_PHASES = {0: f"harness @ {PACED_RATE:g}/s", 20: f"harness @ {PACED_RATE:g}/s, upstream 20 ms"}
PACED = PACED_PHASES[0]
# Polls back to back for the per-poll CPU figure.
BURST = 200
# The 1-minute window spans up to 60 s plus the slot in progress.
CLEAN_WINDOW_S = 75.0

METRICS = [
    Metric("requests", "requests", 0, compare=""),
    Metric("rps", "RPS", 0),
    Metric("p50_ms", "p50 ms", 2),
    Metric("p99_ms", "p99 ms", 2),
]


class Poller:
    """GETs the view once a second from a thread, for as long as it runs."""

    def __init__(self, client: httpx.Client) -> None:
        self._client = client
        self._stop = threading.Event()
        self.polls = 0
        self.failures = 0
        self.seconds: list[float] = []

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            try:
                self._client.get(PATH).raise_for_status()
                self.polls += 1
                self.seconds.append(time.perf_counter() - started)
            except httpx.HTTPError:
                self.failures += 1
            self._stop.wait(max(0.0, 1.0 - (time.perf_counter() - started)))

    @contextlib.contextmanager
    def running(self) -> Iterator[Poller]:
        self._stop.clear()
        thread = threading.Thread(target=self._run, name="perf-poller", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join(timeout=10)


def _client(bench: Bench) -> httpx.Client:
    env = bench.env
    token = httpx.post(
        f"{env.relay_url}/admin/v1/tokens",
        headers={"authorization": f"Bearer {env.admin_key}"},
        json={"scopes": ["admin:read"], "ttl_seconds": 3600},
        timeout=10,
    )
    token.raise_for_status()
    return httpx.Client(
        base_url=env.relay_url, headers={"authorization": f"Bearer {token.json()['token']}"}, timeout=10
    )


def _burst_cpu_ms_per_poll(bench: Bench, client: httpx.Client, quiet_ms_per_s: float) -> float:
    """Relay CPU per poll, from :data:`BURST` polls back to back less the idle relay's own CPU over
    the same span: a figure well above the clock tick's resolution, unlike one poll a second."""
    with CpuWindow(bench.tracked) as window:
        for _ in range(BURST):
            client.get(PATH).raise_for_status()
    return max(0.0, window.cpu_ms["relay"] - quiet_ms_per_s * window.wall_s) / BURST


def _relay_cpu_ms(bench: Bench, seconds: float, poller: Poller | None) -> float:
    with CpuWindow(bench.tracked) as window:
        if poller is None:
            time.sleep(seconds)
        else:
            with poller.running():
                time.sleep(seconds)
    return window.cpu_ms["relay"]


def _await_empty_window(client: httpx.Client, deadline: float) -> None:
    """Waits until the view's 1-minute window holds no request (or ``deadline``, on a monotonic clock)."""
    while time.monotonic() < deadline and client.get(PATH).json()["windows"]["1m"]["requests"]:
        time.sleep(1.0)


def _view_row(view: dict[str, Any], load: Measurement, name: str) -> Measurement:
    window = view["windows"]["1m"]
    requests = window["requests"]
    figures = {
        "requests": requests,
        "rps": requests / load.wall_s if load.wall_s else 0.0,
        "p50_ms": window["latency_ms"]["p50"],
        "p99_ms": window["latency_ms"]["p99"],
    }
    return Measurement(name, figures, load.units, dict(load.cpu_ms), dict(load.memory_mb), load.wall_s)


def performance_view(bench: Bench) -> ScenarioResult:
    result = ScenarioResult(
        12,
        "performance_view",
        f"The performance view vs bench's own figures, {bench.settings.connections} connections",
        "request",
        METRICS,
        baseline=PACED,
    )
    quick = bench.settings.duration_s < 5
    idle_s = 2.0 if quick else IDLE_SPAN_S
    with _client(bench) as client:
        for _ in _runs(bench):
            # Idle, without and then with polling, until the 1-minute window has emptied.
            started = time.monotonic()
            quiet_ms = _relay_cpu_ms(bench, idle_s, None)
            poller = Poller(client)
            polled_ms = _relay_cpu_ms(bench, idle_s, poller)
            per_poll_ms = _burst_cpu_ms_per_poll(bench, client, quiet_ms / idle_s)
            rows: list[Measurement] = []
            under_load = Poller(client)
            for upstream_ms, name in PACED_PHASES.items():
                _await_empty_window(client, started + (0 if quick else CLEAN_WINDOW_S))
                bench.env.upstream.configure(latency_ms=upstream_ms)
                try:
                    with under_load.running():
                        paced = _at_rate(bench, bench.relaygate, PACED_RATE, stream=False)
                        view = client.get(PATH).json()
                finally:
                    bench.env.upstream.configure(latency_ms=0)
                paced.target, paced.compare_to = name, ""
                paced.figures["requests"] = paced.units
                rows += [paced, _view_row(view, paced, f"view: {name}")]
                started = time.monotonic()
            before = view["windows"]["1m"]["requests"]
            with under_load.running():
                load = wrk_measure(bench, "wrk", bench.relaygate, bench.body_plain)
                load.compare_to = ""
            after = client.get(PATH).json()
            saturated = _view_row(after, load, "view: wrk")
            # The 1-minute window holds both loads: count and rate the saturated one by difference.
            saturated.figures["requests"] = after["windows"]["1m"]["requests"] - before
            saturated.figures["rps"] = saturated.figures["requests"] / load.wall_s if load.wall_s else 0.0
            saturated.compare_to = "wrk"
            result.runs.append([*rows, load, saturated])
            cost_pct = (polled_ms - quiet_ms) / (idle_s * 1000) * 100
            idle_per_poll_ms = (polled_ms - quiet_ms) / max(1, poller.polls)
            load_relay_ms = load.cpu_ms.get("relay", 0.0)
            result.extra.setdefault("idle", []).append(
                {
                    "relay_cpu_ms_per_s_quiet": round(quiet_ms / idle_s, 3),
                    "relay_cpu_ms_per_s_polled": round(polled_ms / idle_s, 3),
                    "polling_cost_pct_of_a_core": round(cost_pct, 3),
                    "cpu_ms_per_poll_idle_difference": round(idle_per_poll_ms, 3),
                    "cpu_ms_per_poll": round(per_poll_ms, 3),
                    "polls": poller.polls,
                    "poll_p50_ms": round(sorted(under_load.seconds)[len(under_load.seconds) // 2] * 1000, 2)
                    if under_load.seconds
                    else None,
                    "polls_under_load": under_load.polls,
                    "relay_cpu_ms_per_s_under_load": round(load_relay_ms / load.wall_s, 1)
                    if load.wall_s
                    else None,
                    # One poll a second against what the relay spends per second under this load.
                    "polling_share_of_relay_cpu_under_load_pct": round(
                        per_poll_ms / (load_relay_ms / load.wall_s) * 100, 3
                    )
                    if load_relay_ms and load.wall_s
                    else None,
                }
            )
    medians = {m.target: m for m in result.medians()}
    compared = [(name, ("requests", "rps", "p50_ms", "p99_ms")) for name in PACED_PHASES.values()]
    for theirs_name, keys in (*compared, ("wrk", ("requests", "rps"))):
        theirs, ours = medians.get(theirs_name), medians.get(f"view: {theirs_name}")
        if theirs is None or ours is None:
            continue
        for key in keys:
            if theirs.figures.get(key):
                difference = (ours.figures[key] - theirs.figures[key]) / theirs.figures[key] * 100
                result.extra[f"{theirs_name}: {key}_difference_pct"] = round(difference, 2)
        result.notes.append(
            f"View vs {theirs_name}: "
            + ", ".join(
                f"{k} {result.extra.get(f'{theirs_name}: {k}_difference_pct', 0):+.1f} %" for k in keys
            )
            + "."
        )
    result.notes.append(
        f"At {PACED_RATE:g}/s (open loop, the harness's client) the view's latency is the relay's own "
        "timing, arrival to last byte, and the client's adds the loopback and its own parsing: the same "
        "absolute gap with the upstream answering at once or after 20 ms, a smaller share of the "
        "latter. Under wrk's "
        "saturating closed loop the relay's event loop is the bottleneck: requests wait in the socket "
        "queue before the relay's clock starts, so only the count and the rate are compared there (its "
        "latency columns are the whole minute's, both loads). Percentiles: log buckets, 1 % relative error."
    )
    idle = result.extra.get("idle", [])
    if idle:
        last = idle[-1]
        result.notes.append(
            f"Polling every second at idle: relay CPU {last['relay_cpu_ms_per_s_quiet']} ms/s without, "
            f"{last['relay_cpu_ms_per_s_polled']} ms/s with "
            f"({last['polling_cost_pct_of_a_core']:+.2f} % of a core; the relay's own per-second snapshot "
            f"is in both); {last['cpu_ms_per_poll']} ms of relay CPU per poll over {BURST} polls back to "
            "back; "
            f"under load, one poll a second is {last['polling_share_of_relay_cpu_under_load_pct']} % of the "
            f"relay's CPU ({last['relay_cpu_ms_per_s_under_load']} ms/s)."
        )
    return result
