"""An exact reservation is settled by its usage event (no Settle RPC); without a usage topic, a settle
quota cannot answer is retried off the response path (invariant 2: ledger charges == logged costs, per
request).

Real pieces: quota (``services.quota.app.run``, with its consumer of the usage topic) on the module's
PostgreSQL, reached through a TCP gate that plays the outage, and the relay's :class:`EventPublisher`
on the session's broker.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from devinfra.backing import BackingServices
from services.common.config import KafkaSettings
from services.common.errors import ServiceUnavailable
from services.common.grpc import call
from services.common.ids import new_id
from services.common.pb.relaygate.auth.v1.auth_pb2 import Principal
from services.common.pb.relaygate.common.v1.types_pb2 import Usage
from services.common.pb.relaygate.events.v1.events_pb2 import UsageEvent
from services.common.pb.relaygate.quota.v1 import quota_pb2 as pb
from services.common.pb.relaygate.quota.v1 import quota_pb2_grpc
from services.common.tls import QUOTA
from services.quota.app import run
from services.quota.settings import QuotaSettings
from services.relay.meter.accounting import Meter, SettleRetry
from services.relay.meter.publisher import EventPublisher
from services.relay.meter.record import Exchange
from tests.common.tcp_gate import TcpGate
from tests.db_fixtures import DbUrls
from tests.relay.usage_topic import read_usage
from tests.tls import client, tls_dir

if TYPE_CHECKING:
    from services.common.pb.relaygate.quota.v1.quota_pb2_grpc import QuotaServiceAsyncStub

TIMEOUT = 5.0
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
            "grpc_tls_dir": tls_dir("quota"),
            "grpc_drain_seconds": 0.5,
            "expiry_sweep_interval_s": 0.1,
            **overrides,
        }
    )
    stop = asyncio.Event()
    port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    server = asyncio.create_task(run(settings, stop=stop, on_started=port.set_result))
    starting: set[asyncio.Future[Any]] = {server, port}
    done, _ = await asyncio.wait(starting, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    if server in done:
        server.result()
    gate = TcpGate("127.0.0.1", await port)
    await gate.open()
    try:
        async with client(f"127.0.0.1:{gate.port}", QUOTA) as chan:
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


def settling_from(publisher: EventPublisher) -> dict[str, object]:
    """Quota settings that settle from ``publisher``'s usage topic, in a consumer group of their own."""
    return {
        "kafka_bootstrap": publisher.settings.kafka_bootstrap,
        "kafka_topic_prefix": publisher.settings.kafka_topic_prefix,
        "settle_group_id": new_id("g"),
        "settle_batch_max_seconds": 0.05,
    }


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


async def settled(stub: QuotaServiceAsyncStub, user: str) -> pb.Reservation:
    """The user's one reservation once it is no longer held."""
    deadline = time.monotonic() + 20
    while (held := await reservation(stub, user)).state == "held" and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return held


async def test_an_exact_request_is_settled_by_its_event_without_a_settle_rpc(
    migrated_db: DbUrls, backing: BackingServices, tmp_path: Path
) -> None:
    async with (
        publishing(backing, tmp_path) as publisher,
        quota(migrated_db, **settling_from(publisher)) as (stub, gate),
    ):
        meter = Meter(stub, publisher, rpc_timeout_s=1.0)
        exchange, user = await reserved_exchange(stub, meter)
        nothing, other_user = await reserved_exchange(stub, meter)
        nothing.usage = None
        nothing.end_reason = "upstream_error"

        # The relay cannot reach quota: finishing needs no RPC, the events settle through Kafka.
        await gate.close()
        started = time.monotonic()
        await meter.finish(exchange)
        await meter.finish(nothing)
        assert time.monotonic() - started < 0.5
        assert meter.pending == 0 and exchange.settlement is None
        [event] = await published(publisher.settings, exchange.request_id)
        assert (event.reservation_id, event.cost_micros) == (exchange.request_id, 100)
        assert exchange.reservation is not None
        assert event.price_id == exchange.reservation.price.price_id
        [empty] = await published(publisher.settings, nothing.request_id)
        assert (empty.HasField("usage"), empty.cost_micros) == (False, 0)
        await gate.open()

        held = await settled(stub, user)
        assert (held.state, held.charged_micros) == ("settled", event.cost_micros)
        released = await settled(stub, other_user)
        assert (released.state, released.charged_micros) == ("released", 0)
        # An older relay's Settle of the same request changes nothing.
        late = await call(
            stub.Settle, pb.SettleRequest(reservation_id=exchange.request_id, usage=USAGE), timeout=TIMEOUT
        )
        assert (late.state, late.charged_micros, late.repeated) == ("settled", 100, True)


async def test_the_cost_an_event_carries_never_exceeds_the_hold(
    migrated_db: DbUrls, backing: BackingServices, tmp_path: Path
) -> None:
    async with quota(migrated_db) as (stub, _gate), publishing(backing, tmp_path) as publisher:
        meter = Meter(stub, publisher, rpc_timeout_s=1.0)
        exchange, _user = await reserved_exchange(stub, meter)
        assert exchange.reservation is not None
        exchange.usage = Usage(prompt_tokens=40, completion_tokens=50_000)
        await meter.finish(exchange)
        [event] = await published(publisher.settings, exchange.request_id)
        assert event.cost_micros == exchange.reservation.reserved_micros == 1_040


async def test_without_a_usage_topic_a_settle_quota_missed_is_retried(migrated_db: DbUrls) -> None:
    async with quota(migrated_db) as (stub, gate):
        meter = Meter(
            stub, None, rpc_timeout_s=1.0, retry=SettleRetry(window_s=20, first_delay_s=0.05, max_delay_s=0.3)
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


async def test_without_a_usage_topic_a_given_up_settle_leaves_the_hold_to_expire_charging_nothing(
    migrated_db: DbUrls,
) -> None:
    async with quota(migrated_db, reservation_ttl_s=2) as (stub, gate):
        meter = Meter(
            stub,
            None,
            rpc_timeout_s=0.5,
            retry=SettleRetry(window_s=0.6, first_delay_s=0.05, max_delay_s=0.2),
        )
        exchange, user = await reserved_exchange(stub, meter)

        await gate.close()
        await meter.finish(exchange)
        await meter.close(timeout=5)
        assert exchange.settlement is None
        await gate.open()

        held = await settled(stub, user)
        assert (held.state, held.charged_micros) == ("expired", 0)
        # A settle that arrives after the expiry changes nothing.
        late = await call(
            stub.Settle, pb.SettleRequest(reservation_id=exchange.request_id, usage=USAGE), timeout=TIMEOUT
        )
        assert (late.state, late.charged_micros, late.repeated) == ("expired", 0, True)
