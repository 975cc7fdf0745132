"""The relay's way out after SIGTERM: every step timed in the log and bounded, whatever a client or a
backing service does.

The relays here are real processes (``python -m services.relay``, or a small server script for the
overruns) whose auth, quota, Kafka and Redis either refuse connections or accept them and never
answer; the local stack gives a relay 20 s before SIGKILL, these must exit well within it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from devinfra.processes import ManagedProcess, free_ports
from services.common.perfboard import Board
from services.common.redis import redis_client
from services.relay.edge.http.shutdown import ShutdownClock, ShutdownSteps
from tests.log_records import extra

ROOT = Path(__file__).resolve().parents[2]
# Steps of the relay's lifespan, in the order they run (with Redis and Kafka configured; without a
# gRPC front its step runs and logs all the same).
STEPS = [
    "grpc_front",
    "performance_board",
    "streams",
    "settlements",
    "leases",
    "prices",
    "channel_directory",
    "upstream_pools",
    "key_invalidations",
    "redis",
    "publisher",
    "logger_channel",
    "catalog_channel",
    "quota_channel",
    "auth_channel",
    "tracing",
]


@contextlib.contextmanager
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) and never answers on them."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield int(listener.getsockname()[1])


def clean_environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("RELAYGATE_", "OTEL_"))}


@contextlib.contextmanager
def relay(tmp_path: Path, backing: dict[str, int], **settings: str) -> Iterator[ManagedProcess]:
    """A relay process whose services are at ``backing``'s ports, started and listening."""
    port = free_ports(1)[0]
    env = {
        **clean_environ(),
        "RELAYGATE_RELAY_PORT": str(port),
        "RELAYGATE_GRPC_TLS": "off",
        "RELAYGATE_LOG_FORMAT": "json",
        "RELAYGATE_RPC_TIMEOUT_S": "0.5",
        "RELAYGATE_AUTH_ADDR": f"127.0.0.1:{backing['auth']}",
        "RELAYGATE_QUOTA_ADDR": f"127.0.0.1:{backing['quota']}",
        "RELAYGATE_LOGGER_ADDR": f"127.0.0.1:{backing['logger']}",
        "RELAYGATE_KAFKA_BOOTSTRAP": f"127.0.0.1:{backing['kafka']}",
        "RELAYGATE_REDIS_URL": f"redis://127.0.0.1:{backing['redis']}/0",
        "RELAYGATE_EVENT_SPOOL_DIR": str(tmp_path / "spool"),
        "RELAYGATE_HTTP_DRAIN_S": "1",
        "RELAYGATE_GRPC_DRAIN_SECONDS": "1",
        **settings,
    }
    argv = [sys.executable, "-m", "services.relay"]
    process = ManagedProcess("relay", argv, tmp_path / "relay.log", env=env, cwd=ROOT, port=port)
    try:
        process.wait_listening(timeout=60)
        yield process
    finally:
        process.kill()


def stop(process: ManagedProcess, grace: float = 20.0) -> tuple[int, float]:
    """SIGTERM as the local stack sends it; the exit code and the seconds it took."""
    started = time.monotonic()
    code = process.send(signal.SIGTERM, grace)
    return code, time.monotonic() - started


def log_lines(process: ManagedProcess, msg: str) -> list[dict[str, Any]]:
    found = []
    for line in process.output().splitlines():
        if line.startswith("{"):
            record = orjson.loads(line)
            if record.get("msg") == msg:
                found.append(record)
    return found


def test_a_request_whose_body_never_ends_is_cut_at_the_drain(tmp_path: Path) -> None:
    auth, quota, logger, kafka, redis = free_ports(5)
    backing = {"auth": auth, "quota": quota, "logger": logger, "kafka": kafka, "redis": redis}
    with (
        relay(tmp_path, backing, RELAYGATE_SHUTDOWN_TIMEOUT_S="8") as process,
        socket.create_connection(("127.0.0.1", process.port)) as client,
    ):
        client.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: relay\r\nauthorization: Bearer rg-x\r\n"
            b'content-length: 100\r\n\r\n{"model":'
        )
        time.sleep(0.5)
        code, took = stop(process)
        client.settimeout(5)
        with contextlib.suppress(ConnectionResetError):
            while client.recv(65536):
                pass

    # uvicorn alone waits 30 s for it (its graceful shutdown), past the stack's 20 s.
    assert code == -signal.SIGTERM
    assert took < 6, took
    [started] = log_lines(process, "shutdown started")
    assert started["signal"] == "SIGTERM" and started["requests"] == 1
    drain = next(s for s in log_lines(process, "shutdown step") if s["step"] == "http_drain")
    assert drain["outcome"] == "timed_out" and drain["cancelled"] == 1
    assert 1000 <= drain["ms"] < 3000
    assert log_lines(process, "shutdown complete")


def test_every_step_is_logged_and_bounded_while_the_backing_services_never_answer(tmp_path: Path) -> None:
    with silent_port() as quota, silent_port() as auth, silent_port() as redis:
        logger, kafka = free_ports(2)
        backing = {"auth": auth, "quota": quota, "logger": logger, "kafka": kafka, "redis": redis}
        with relay(tmp_path, backing, RELAYGATE_SHUTDOWN_TIMEOUT_S="12") as process:
            code, took = stop(process)

    assert code == -signal.SIGTERM
    assert took < 10, took
    steps = [s for s in log_lines(process, "shutdown step") if s["step"] not in ("http_drain", "lifespan")]
    # In this order (a component added later brings a step of its own).
    assert [s["step"] for s in steps if s["step"] in STEPS] == STEPS
    assert all(s["outcome"] == "done" and s["ms"] >= 0 for s in steps), steps
    [complete] = log_lines(process, "shutdown complete")
    assert complete["ms"] < took * 1000


# A relay-like server whose lifespan's shutdown overruns: it awaits forever, or blocks the event loop.
_OVERRUN = """
import asyncio, sys, time, uvicorn
from services.common.telemetry import setup_logging
from services.relay.edge.http.server import RelayServer

async def app(scope, receive, send):
    if scope["type"] != "lifespan":
        return
    await receive()
    await send({"type": "lifespan.startup.complete"})
    await receive()
    if sys.argv[1] == "awaits":
        await asyncio.Event().wait()
    time.sleep(60)

setup_logging("relay", level="INFO", fmt="json")
config = uvicorn.Config(app, host="127.0.0.1", port=int(sys.argv[2]), lifespan="on", log_config=None)
RelayServer(config, drain_s=1, timeout_s=3).run()
"""


@pytest.mark.parametrize("hang", ["awaits", "blocks"])
def test_a_lifespan_that_overruns_ends_at_the_timeout_saying_where_it_waited(
    tmp_path: Path, hang: str
) -> None:
    port = free_ports(1)[0]
    argv = [sys.executable, "-c", _OVERRUN, hang, str(port)]
    process = ManagedProcess(
        "overrun", argv, tmp_path / "overrun.log", env=clean_environ(), cwd=ROOT, port=port
    )
    try:
        process.wait_listening(timeout=30)
        code, took = stop(process)
    finally:
        process.kill()

    assert took < 6, took
    output = process.output()
    if hang == "awaits":
        # The event loop reports it: the lifespan step timed out, naming the task that waited.
        [lifespan] = [s for s in log_lines(process, "shutdown step") if s["step"] == "lifespan"]
        assert lifespan["outcome"] == "timed_out"
        assert any("app" in pending for pending in lifespan["pending"]), lifespan
        assert code == -signal.SIGTERM
    else:
        # The loop never comes back: the watchdog thread writes the stacks and ends the process.
        assert "Timeout (0:00:0" in output and " in app" in output, output[-2000:]
        assert code == 1


# --- the steps themselves -----------------------------------------------------------------------------


async def test_a_step_that_never_returns_is_cut_and_the_next_ones_still_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ran: list[str] = []

    async def hangs() -> None:
        await asyncio.Event().wait()

    async def fails() -> None:
        raise RuntimeError("broken close")

    async def spools() -> None:
        ran.append("publisher")

    caplog.set_level(logging.INFO, logger="services.relay.edge.http.shutdown")
    started = time.monotonic()
    async with contextlib.AsyncExitStack() as stack:
        steps = ShutdownSteps(stack)
        steps.push("publisher", spools, deadline_s=1.0)
        steps.push("leases", fails, deadline_s=1.0)
        steps.push("streams", hangs, deadline_s=0.2)

    assert time.monotonic() - started < 1.0
    assert ran == ["publisher"]
    lines = [
        (extra(r, "step", str), extra(r, "outcome", str)) for r in caplog.records if r.msg == "shutdown step"
    ]
    assert lines == [("streams", "timed_out"), ("leases", "failed"), ("publisher", "done")]


async def test_a_step_that_overruns_the_way_out_leaves_the_publisher_its_reserved_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ran: list[str] = []

    async def drains() -> None:
        await asyncio.Event().wait()

    async def spools() -> None:
        await asyncio.sleep(0.3)
        ran.append("publisher")

    caplog.set_level(logging.INFO, logger="services.relay.edge.http.shutdown")
    clock = ShutdownClock()
    async with contextlib.AsyncExitStack() as stack:
        steps = ShutdownSteps(stack, clock)
        steps.push("publisher", spools, deadline_s=5.0, reserve_s=0.6)
        steps.push("streams", drains, deadline_s=5.0)
        clock.ends_at = time.monotonic() + 1.0

    # The stream drain got what the publisher did not keep; the publisher then had its 0.3 s.
    assert ran == ["publisher"]
    lines = {extra(r, "step", str): r for r in caplog.records if r.msg == "shutdown step"}
    streams = lines["streams"]
    assert extra(streams, "outcome", str) == "timed_out" and 300 <= extra(streams, "ms", float) < 600
    assert extra(lines["publisher"], "outcome", str) == "done"


async def test_the_performance_board_leaves_at_once_when_redis_never_answers() -> None:
    with silent_port() as port:
        redis = redis_client(f"redis://127.0.0.1:{port}/0")
        board = Board(redis, "relay:shutdown-test", dict)
        board.start()
        await asyncio.sleep(0.1)
        started = time.monotonic()
        await board.close()
        took = time.monotonic() - started
        await redis.aclose()

    # SREM then DEL, each waiting out its 0.5 s read timeout, took 1 s; one pipelined round trip is
    # given 0.5 s.
    assert took < 0.9, took
