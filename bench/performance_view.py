"""Scenario 12: the live performance view (``GET /admin/v1/performance``) against bench's own figures,
and what polling it every second costs the relay.

Per run: the relay idles until its 1-minute window is empty (about a minute), and meanwhile its CPU is
read over two equal spans, without and then with the view polled once a second; the difference is the
polling's cost (the snapshot each relay posts every second is in both). Then scenario 1's load (wrk,
closed loop) runs with the view polled every second, and the view read right after it holds exactly
that load in its 1-minute window: its request count, rate (over the load's duration) and latency
percentiles are set next to wrk's.
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
from bench.scenarios import Bench, _runs, wrk_measure

__all__ = ["performance_view"]

PATH = "/admin/v1/performance"
IDLE_SPAN_S = 30.0
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


def _relay_cpu_ms(bench: Bench, seconds: float, poller: Poller | None) -> float:
    with CpuWindow(bench.tracked) as window:
        if poller is None:
            time.sleep(seconds)
        else:
            with poller.running():
                time.sleep(seconds)
    return window.cpu_ms["relay"]


def _view_row(view: dict[str, Any], load: Measurement) -> Measurement:
    window = view["windows"]["1m"]
    requests = window["requests"]
    figures = {
        "requests": requests,
        "rps": requests / load.wall_s if load.wall_s else 0.0,
        "p50_ms": window["latency_ms"]["p50"],
        "p99_ms": window["latency_ms"]["p99"],
    }
    return Measurement(
        "performance view", figures, requests, dict(load.cpu_ms), dict(load.memory_mb), load.wall_s
    )


def performance_view(bench: Bench) -> ScenarioResult:
    result = ScenarioResult(
        12,
        "performance_view",
        f"The performance view vs bench's own figures, {bench.settings.connections} connections",
        "request",
        METRICS,
        baseline="wrk",
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
            deadline = started + (0 if quick else CLEAN_WINDOW_S)
            while time.monotonic() < deadline and client.get(PATH).json()["windows"]["1m"]["requests"]:
                time.sleep(1.0)
            under_load = Poller(client)
            with under_load.running():
                load = wrk_measure(bench, "wrk", bench.relaygate, bench.body_plain)
            view = client.get(PATH).json()
            row = _view_row(view, load)
            result.runs.append([load, row])
            cost_pct = (polled_ms - quiet_ms) / (idle_s * 1000) * 100
            per_poll_ms = (polled_ms - quiet_ms) / max(1, poller.polls)
            load_relay_ms = load.cpu_ms.get("relay", 0.0)
            result.extra.setdefault("idle", []).append(
                {
                    "relay_cpu_ms_per_s_quiet": round(quiet_ms / idle_s, 3),
                    "relay_cpu_ms_per_s_polled": round(polled_ms / idle_s, 3),
                    "polling_cost_pct_of_a_core": round(cost_pct, 3),
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
    wrk, shown = medians.get("wrk"), medians.get("performance view")
    if wrk is not None and shown is not None:
        for key in ("requests", "rps", "p50_ms", "p99_ms"):
            ours, theirs = shown.figures.get(key, 0.0), wrk.figures.get(key, 0.0)
            if theirs:
                result.extra[f"{key}_difference_pct"] = round((ours - theirs) / theirs * 100, 2)
        result.notes.append(
            "Differences, view vs wrk: "
            + ", ".join(
                f"{k} {result.extra.get(f'{k}_difference_pct', 0):+.1f} %"
                for k in ("requests", "rps", "p50_ms", "p99_ms")
            )
            + ". The view's latency is the relay's (arrival to last byte); wrk's adds the client side and "
            "the loopback. Percentiles: log buckets, 1 % relative error."
        )
    idle = result.extra.get("idle", [])
    if idle:
        last = idle[-1]
        result.notes.append(
            f"Polling every second at idle: relay CPU {last['relay_cpu_ms_per_s_quiet']} ms/s without, "
            f"{last['relay_cpu_ms_per_s_polled']} ms/s with "
            f"({last['polling_cost_pct_of_a_core']:+.2f} % of a core, {last['cpu_ms_per_poll']} ms per poll; "
            "the relay's own per-second snapshot is in both); "
            f"under load, one poll a second is {last['polling_share_of_relay_cpu_under_load_pct']} % of the "
            f"relay's CPU ({last['relay_cpu_ms_per_s_under_load']} ms/s)."
        )
    return result
