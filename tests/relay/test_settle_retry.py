"""A settle quota cannot answer is retried off the response path, and the usage event carries what
the ledger actually charged (invariant 2: ledger charges == logged costs, per request).

Real pieces: quota (``services.quota.app.run``) on the module's PostgreSQL, reached through a TCP
gate that plays the outage, and the relay's :class:`EventPublisher` on the session's broker.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from devinfra.backing import BackingServices
from services.common.config import KafkaSettings
from services.common.errors import ServiceUnavailable
from services.common.grpc import call, channel
from services.common.ids import new_id
from services.common.pb.relaygate.auth.v1.auth_pb2 import Principal
from services.common.pb.relaygate.common.v1.types_pb2 import Usage
from services.common.pb.relaygate.events.v1.events_pb2 import UsageEvent
from services.common.pb.relaygate.quota.v1 import quota_pb2 as pb
from services.common.pb.relaygate.quota.v1 import quota_pb2_grpc
from services.quota.app import run
from services.quota.settings import QuotaSettings
from services.relay.accounting import Exchange, Meter, SettleRetry
from services.relay.journal import SettleJournal
from services.relay.publisher import EventPublisher
from tests.common.tcp_gate import TcpGate
from tests.db_fixtures import DbUrls
from tests.relay.usage_topic import read_usage

if TYPE_CHECKING:
    from services.common.pb.relaygate.quota.v1.quota_pb2_grpc import QuotaServiceAsyncStub

TIMEOUT = 5.0
REPO = Path(__file__).resolve().parents[2]
# 1,000,000 micro-units per million tokens: one micro-unit per token.
PRICE = pb.Price(input_per_mtok=1_000_000, output_per_mtok=1_000_000)
USAGE = Usage(prompt_tokens=40, completion_tokens=60)


@asynccontextmanager
async def quota(urls: DbUrls, **overrides: object) -> AsyncIterator[tuple[QuotaServiceAsyncStub, TcpGate]]:
    """Quota in this loop; the stub reaches it through a gate the test can close."""
    settings = QuotaSettings.model_validate(
        {
            "database_url": urls.primary,
            "quota_listen": "127.0.0.1:0",
            "grpc_drain_seconds": 0.5,
            "expiry_sweep_interval_s": 0.1,
            **overrides,
        }
    )
    stop = asyncio.Event()
    port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    server = asyncio.create_task(run(settings, stop=stop, on_started=port.set_result))
    done, _ = await asyncio.wait({server, port}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    if server in done:
        server.result()
    gate = TcpGate("127.0.0.1", await port)
    await gate.open()
    try:
        async with channel(f"127.0.0.1:{gate.port}") as chan:
            yield quota_pb2_grpc.QuotaServiceStub(chan), gate
    finally:
        await gate.close()
        stop.set()
        await asyncio.wait_for(server, timeout=10)


@asynccontextmanager
async def publishing(backing: BackingServices, tmp_path: Path) -> AsyncIterator[EventPublisher]:
    settings = KafkaSettings(
        kafka_bootstrap=backing.kafka_bootstrap, kafka_topic_prefix=f"settle{uuid.uuid4().hex[:8]}."
    )
    publisher = EventPublisher(settings, spool_dir=tmp_path / "spool", shutdown_timeout_s=3.0)
    await publisher.start()
    try:
        yield publisher
    finally:
        await publisher.close()


async def published(settings: KafkaSettings, event_id: str, timeout: float = 15.0) -> list[UsageEvent]:
    """The events with ``event_id`` on the usage topic (read from the start)."""

    def mine(events: list[UsageEvent]) -> list[UsageEvent]:
        return [event for event in events if event.event_id == event_id]

    return mine(await read_usage(settings, lambda events: bool(mine(events)), timeout=timeout))


async def reserved_exchange(stub: QuotaServiceAsyncStub, meter: Meter) -> tuple[Exchange, str]:
    model, user = new_id("retry-model"), new_id("u")
    await call(stub.SetPrice, pb.Price(model=model, **_rates()), timeout=TIMEOUT)
    await call(stub.TopUp, pb.TopUpRequest(user_id=user, amount_micros=100_000), timeout=TIMEOUT)
    exchange = Exchange(request_id=new_id("req"), endpoint="chat", client_ip="127.0.0.1")
    exchange.principal = Principal(key_id=new_id("key"), user_id=user)
    exchange.model = model
    await meter.reserve(exchange, prompt_tokens=40, max_output_tokens=1_000)
    exchange.usage = USAGE
    exchange.status_code = 200
    exchange.end_reason = "done"
    return exchange, user


def _rates() -> dict[str, int]:
    return {"input_per_mtok": PRICE.input_per_mtok, "output_per_mtok": PRICE.output_per_mtok}


async def reservation(stub: QuotaServiceAsyncStub, user: str) -> pb.Reservation:
    """The user's one reservation; waits out the client channel's reconnect after the gate opens."""
    deadline = time.monotonic() + 10
    while True:
        try:
            listing = await call(
                stub.ListReservations,
                pb.ListReservationsRequest(user_id=user, consistent=True),
                timeout=TIMEOUT,
            )
            break
        except ServiceUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
    [found] = listing.reservations
    return found


async def test_a_settle_quota_missed_is_retried_and_the_event_carries_the_charge(
    migrated_db: DbUrls, backing: BackingServices, tmp_path: Path
) -> None:
    async with quota(migrated_db) as (stub, gate), publishing(backing, tmp_path) as publisher:
        meter = Meter(
            stub,
            publisher,
            rpc_timeout_s=1.0,
            retry=SettleRetry(window_s=20, first_delay_s=0.05, max_delay_s=0.3),
        )
        exchange, user = await reserved_exchange(stub, meter)

        await gate.close()
        started = time.monotonic()
        await meter.finish(exchange)
        # The response is not held up by the outage: one failed attempt, the rest in the background.
        assert time.monotonic() - started < 1.5
        assert meter.pending == 1 and exchange.settlement is None
        await asyncio.sleep(0.5)
        await gate.open()

        await meter.close(timeout=15)
        assert meter.pending == 0
        held = await reservation(stub, user)
        assert (held.state, held.charged_micros) == ("settled", 100)
        [event] = await published(publisher.settings, exchange.request_id)
        assert event.cost_micros == held.charged_micros == 100


async def test_given_up_settle_publishes_zero_and_the_expired_hold_charges_nothing(
    migrated_db: DbUrls, backing: BackingServices, tmp_path: Path
) -> None:
    async with (
        quota(migrated_db, reservation_ttl_s=2) as (stub, gate),
        publishing(backing, tmp_path) as publisher,
    ):
        meter = Meter(
            stub,
            publisher,
            rpc_timeout_s=0.5,
            retry=SettleRetry(window_s=0.6, first_delay_s=0.05, max_delay_s=0.2),
        )
        exchange, user = await reserved_exchange(stub, meter)

        await gate.close()
        await meter.finish(exchange)
        await meter.close(timeout=5)
        [event] = await published(publisher.settings, exchange.request_id)
        assert event.cost_micros == 0
        await gate.open()

        deadline = time.monotonic() + 10
        while (held := await reservation(stub, user)).state == "held" and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert (held.state, held.charged_micros) == ("expired", event.cost_micros)
        # A settle that arrives after the expiry changes nothing.
        late = await call(
            stub.Settle, pb.SettleRequest(reservation_id=exchange.request_id, usage=USAGE), timeout=TIMEOUT
        )
        assert (late.state, late.charged_micros, late.repeated) == ("expired", 0, True)


def die_with_journal(spool_dir: Path, records: list[tuple[str, UsageEvent]]) -> None:
    """A relay process that journals ``records`` (begin-settle / done) and is killed (SIGKILL)."""
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from services.common.events import decode\n"
        "from services.relay.journal import SettleJournal\n"
        "journal = SettleJournal(Path(sys.argv[1]), retain_s=60)\n"
        "journal.open()\n"
        "for kind, payload in zip(sys.argv[2::2], sys.argv[3::2]):\n"
        "    event = decode(bytes.fromhex(payload))\n"
        "    journal.done(event) if kind == 'done' else journal.begin(event, settle=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    argv = [sys.executable, "-c", script, str(spool_dir)]
    for kind, event in records:
        argv += [kind, event.SerializeToString().hex()]
    finished = subprocess.run(argv, cwd=REPO, timeout=30, check=False)
    assert finished.returncode == -signal.SIGKILL


async def test_a_relay_killed_mid_settlement_is_finished_by_the_next_from_its_journal(
    migrated_db: DbUrls, backing: BackingServices, tmp_path: Path
) -> None:
    spool_dir = tmp_path / "spool"
    async with quota(migrated_db) as (stub, _gate), publishing(backing, tmp_path) as publisher:
        dead = Meter(stub, None, rpc_timeout_s=TIMEOUT)  # it never got to publish anything
        unsettled, user = await reserved_exchange(stub, dead)
        settled, other_user = await reserved_exchange(stub, dead)
        await dead.finish(settled)
        assert settled.settlement is not None and settled.settlement.charged_micros == 100
        # The dead relay got as far as: Settle not sent for one; the other settled (the ledger
        # charged it) but its event never left the process.
        die_with_journal(spool_dir, [("begin", unsettled.to_event()), ("done", settled.to_event())])

        journal = SettleJournal(spool_dir, retain_s=60)
        successor = Meter(stub, publisher, rpc_timeout_s=TIMEOUT, journal=journal)
        successor.start()
        await successor.close(timeout=15)
        journal.close()

        for exchange, owner in ((unsettled, user), (settled, other_user)):
            held = await reservation(stub, owner)
            assert (held.state, held.charged_micros) == ("settled", 100)
            events = await published(publisher.settings, exchange.request_id)
            assert {e.cost_micros for e in events} == {held.charged_micros}
    # Nothing is left for a third relay.
    assert SettleJournal(spool_dir, retain_s=60).open() == []
