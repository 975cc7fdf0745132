"""Driving wrk (closed-loop throughput) and parsing what it reports.

wrk is a C load generator from Debian: one thread pushes well over 50k requests per second on this
machine, far more than anything measured here, so it is not the bottleneck. ``bench/lua/chat.lua``
rotates through API keys and prints a ``BENCH_WRK {...}`` JSON line from wrk's ``done()`` hook, which is
what :func:`parse_wrk` reads. The load generator's own CPU time comes from ``wait4()``'s resource usage.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LUA_DIR", "WrkResult", "parse_wrk", "run_wrk"]

LUA_DIR = Path(__file__).parent / "lua"
_MARK = "BENCH_WRK "


@dataclass(frozen=True)
class WrkResult:
    requests: int
    duration_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    socket_errors: int  # connect + read + write + timeout
    non_2xx: int
    loadgen_cpu_ms: float = 0.0

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def errors(self) -> int:
        return self.socket_errors + self.non_2xx


def parse_wrk(stdout: str, loadgen_cpu_ms: float = 0.0) -> WrkResult:
    """Read the ``BENCH_WRK`` line that ``chat.lua``'s ``done()`` prints."""
    for line in stdout.splitlines():
        if line.startswith(_MARK):
            data = json.loads(line[len(_MARK) :])
            return WrkResult(
                requests=int(data["requests"]),
                duration_s=data["duration_us"] / 1e6,
                p50_ms=data["p50_us"] / 1000,
                p90_ms=data["p90_us"] / 1000,
                p99_ms=data["p99_us"] / 1000,
                mean_ms=data["mean_us"] / 1000,
                max_ms=data["max_us"] / 1000,
                socket_errors=int(data["connect"] + data["read"] + data["write"] + data["timeout"]),
                non_2xx=int(data["status"]),
                loadgen_cpu_ms=loadgen_cpu_ms,
            )
    raise ValueError(f"no {_MARK.strip()} line in wrk's output:\n{stdout[-2000:]}")


def run_wrk(
    url: str,
    *,
    keys_file: Path,
    body_file: Path,
    connections: int,
    duration_s: float,
    threads: int = 1,
    wrk: str = "wrk",
    request_timeout_s: float = 30,
    headers: Sequence[tuple[str, str]] = (),
) -> WrkResult:
    """Run wrk against ``url`` (a full URL, loopback) for ``duration_s`` seconds; never longer than that
    plus a grace period: a wrk that does not exit by then is killed and the run fails. ``headers`` go on
    every request, after the API key and content type."""
    if not url.startswith("http://127.0.0.1:"):
        raise ValueError(f"load is only ever sent to 127.0.0.1, not {url}")
    argv = [
        wrk,
        f"-t{threads}",
        f"-c{max(connections, threads)}",
        f"-d{max(1, round(duration_s))}s",
        f"--timeout={request_timeout_s:g}s",
        "-s",
        str(LUA_DIR / "chat.lua"),
        url,
        "--",
        str(keys_file),
        str(body_file),
        *(f"{name}: {value}" for name, value in headers),
    ]
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
    )
    deadline = time.monotonic() + duration_s + 30
    assert process.stdout is not None and process.stderr is not None
    # wait4() gives the child's rusage; poll it so a hung wrk is killed at the deadline.
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            process.send_signal(signal.SIGKILL)
            pid, status, usage = os.wait4(process.pid, 0)
            process.returncode = -signal.SIGKILL
            raise TimeoutError(f"wrk did not finish within {duration_s + 30:.0f}s: {argv}")
        time.sleep(0.05)
    process.returncode = os.waitstatus_to_exitcode(status)
    stdout, stderr = process.stdout.read(), process.stderr.read()
    process.stdout.close()
    process.stderr.close()
    if process.returncode != 0:
        raise RuntimeError(f"wrk exited with {process.returncode}: {stderr.strip() or stdout[-500:]}")
    return parse_wrk(stdout, (usage.ru_utime + usage.ru_stime) * 1000)
