"""Settlement from the usage stream: quota's consumer of the usage topic charges leases and settles exact
reservations from usage events, and charges late the events of reservations that expired or were
released before their event came.

Real Apache Kafka and PostgreSQL (primary + replica): events are produced to a topic of this test's
own, consumed in a group of its own by :func:`services.quota.settling.settling` (as quota's lifespan
runs it), and charged by a real :class:`~services.quota.leasing.CreditStore`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition
from prometheus_client import REGISTRY
from sqlalchemy import delete, insert, select

from devinfra.backing import BackingServices
from services.common.clock import ManualClock
from services.common.config import DatabaseSettings
from services.common.credit import Charge, CreditTerms, LeaseAsk, SyncRequest
from services.common.db import Database
from services.common.errors import ConcurrencyLimited
from services.common.events import encode
from services.common.ids import new_id
from services.common.pb.relaygate.common.v1.types_pb2 import Usage
from services.common.pb.relaygate.events.v1.events_pb2 import UsageEvent
from services.common.pricing import Usage as PricedUsage
from services.migrations import upgrade
from services.quota import models
from services.quota.app import run
from services.quota.budgets import Budgets, Calendar
from services.quota.late_charges import LateCharges
from services.quota.leasing import CreditStore
from services.quota.ledger import Hold, Ledger
from services.quota.limits import Limits
from services.quota.pricing import Price, PriceBook
from services.quota.settings import QuotaSettings
from services.quota.settling import ExactSettlement, SettlingSettings, charge_of, settlement_of, settling
from tests.common.tcp_gate import TcpGate
from tests.db_fixtures import DbUrls
from tests.in_process import in_process
from tests.logger.factories import eventually
from tests.quota.factories import funded_user, priced_model
from tests.quota.fixtures import TTL_S
from tests.tls import tls_dir

TERMS = CreditTerms()
WAIT_S = 20.0


@pytest.fixture
def settle_settings(backing: BackingServices) -> SettlingSettings:
    """A topic and a consumer group of this test's own; short timings so each test takes seconds."""
    return SettlingSettings.model_validate(
        {
            "kafka_bootstrap": backing.kafka_bootstrap,
            "kafka_topic_prefix": f"{new_id('t')}.",
            "kafka_partitions": 2,
            "settle_group_id": new_id("g"),
            "kafka_session_timeout_ms": 3000,
            "kafka_heartbeat_interval_ms": 300,
            "settle_batch_max_seconds": 0.1,
            "settle_write_timeout_s": 2.0,
            "settle_shutdown_timeout_s": 1.0,
        }
    )


@pytest.fixture
def store(database: Database, clock: ManualClock) -> CreditStore:
    return CreditStore(database, Calendar(), TERMS, clock)


class UsageTopic:
    """Produces to the test's usage topic (keyed by user, as relays do) and reads its group's offsets."""

    def __init__(self, settings: SettlingSettings) -> None:
        self.settings = settings
        # Per partition, one past the last offset produced (from the acknowledgements).
        self.ends: dict[int, int] = {}

    async def produce(self, messages: Iterable[UsageEvent | bytes]) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.settings.kafka_bootstrap, acks="all", linger_ms=5)
        await producer.start()
        try:
            pending = []
            for message in messages:
                if isinstance(message, UsageEvent):
                    value, key = encode(message), message.user_id.encode()
                else:
                    value, key = message, b"raw"
                pending.append(await producer.send(self.settings.usage_topic, value, key=key))
            for sent in await asyncio.gather(*pending):
                self.ends[sent.partition] = max(self.ends.get(sent.partition, 0), sent.offset + 1)
        finally:
            await producer.stop()

    async def uncommitted(self) -> int:
        """Messages produced beyond the settling group's committed offsets."""
        # aiokafka retries some coordinator errors forever: fail the test rather than hang it.
        return await asyncio.wait_for(self._uncommitted(), 15)

    async def _uncommitted(self) -> int:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            group_id=self.settings.settle_group_id,
            enable_auto_commit=False,
        )
        await consumer.start()
        try:
            lag = 0
            for partition, end in self.ends.items():
                committed = await consumer.committed(TopicPartition(self.settings.usage_topic, partition))
                lag += end - (committed or 0)
            return lag
        finally:
            await consumer.stop()


async def open_lease(store: CreditStore, ledger: Ledger, *, balance: int = 1_000_000) -> LeaseAsk:
    user = await funded_user(ledger, balance)
    lease = LeaseAsk(new_id("lse"), new_id("k"), user, 100_000, 1_000)
    [grant] = (await store.sync(SyncRequest(new_id("relay"), 1, asks=(lease,)))).grants
    assert grant.state == "open", grant
    return lease


def used_on(lease: LeaseAsk, cost: int, **fields: Any) -> UsageEvent:
    """The usage event of one request admitted on ``lease``."""
    values: dict[str, Any] = {
        "event_id": new_id("req"),
        "occurred_at_ms": int(time.time() * 1000),
        "key_id": lease.key_id,
        "user_id": lease.user_id,
        "model": "gpt-4o-mini",
        "endpoint": "/v1/chat/completions",
        "status_code": 200,
        "cost_micros": cost,
        "price_id": 1,
        "lease_id": lease.lease_id,
    }
    values.update(fields)
    return UsageEvent(**values)


async def charges_on(db: Database, lease: LeaseAsk) -> list[tuple[str, int]]:
    """(request id, amount) of every ledger charge against the lease (a double charge shows twice)."""
    async with db.reader(consistent=True) as session:
        rows = await session.execute(
            select(models.LedgerEntry.reservation_id, models.LedgerEntry.amount_micros).where(
                models.LedgerEntry.hold_id == lease.lease_id
            )
        )
        return sorted((str(rid), int(amount)) for rid, amount in rows.all())


def expected(events: Iterable[UsageEvent]) -> list[tuple[str, int]]:
    return sorted({(e.event_id, -e.cost_micros) for e in events if e.cost_micros})


async def charged_all(db: Database, lease: LeaseAsk, events: list[UsageEvent]) -> None:
    async def done() -> bool:
        return len(await charges_on(db, lease)) >= len(expected(events))

    await eventually(done, timeout=WAIT_S, what="the leased events to be charged")
    assert await charges_on(db, lease) == expected(events)


async def committed_all(topic: UsageTopic) -> None:
    async def done() -> bool:
        return await topic.uncommitted() == 0

    await eventually(done, timeout=WAIT_S, what="the settling group to commit every offset")


async def clean(ledger: Ledger) -> None:
    assert [d.describe() for d in await ledger.reconcile(consistent=True)] == []


def records(result: str) -> float:
    return REGISTRY.get_sample_value("relaygate_quota_settle_records_total", {"result": result}) or 0.0


# --- settings, and what an event becomes ----------------------------------------------------------------


def test_quota_settles_in_a_group_of_its_own_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = QuotaSettings.model_validate({})
    assert (
        defaults.settle_group_id,
        defaults.settle_policy.max_rows,
        defaults.settle_policy.max_seconds,
    ) == (
        "relaygate-quota",
        1000,
        0.2,
    )
    monkeypatch.setenv("RELAYGATE_SETTLE_GROUP_ID", "quota-eu")
    monkeypatch.setenv("RELAYGATE_SETTLE_BATCH_MAX_ROWS", "250")
    settings = QuotaSettings()
    assert (settings.settle_group_id, settings.settle_policy.max_rows) == ("quota-eu", 250)
    with pytest.raises(ValueError, match="SETTLE_GROUP_ID"):
        SettlingSettings.model_validate({"settle_group_id": " "})


def test_an_event_is_a_charge_only_when_admitted_on_a_lease() -> None:
    lease = LeaseAsk("lse_1", "k_1", "u_1", 100, 1)
    event = used_on(lease, 1_234)
    assert charge_of(event) == Charge(event.event_id, "lse_1", "k_1", "u_1", 1_234)
    assert charge_of(used_on(lease, 0)) is not None
    assert charge_of(used_on(lease, 500, lease_id="", reservation_id="rsv_1")) is None
    assert charge_of(UsageEvent(event_id="refusals-r1-17", aggregated=40)) is None


def test_an_event_settles_a_reservation_only_when_it_names_one_and_no_lease() -> None:
    lease = LeaseAsk("lse_1", "k_1", "u_1", 100, 1)
    usage = Usage(prompt_tokens=12, completion_tokens=30, estimated=True)
    event = used_on(lease, 640, lease_id="", reservation_id="req_1", usage=usage)
    assert settlement_of(event) == ExactSettlement(
        "req_1", PricedUsage(prompt_tokens=12, completion_tokens=30, estimated=True), 640
    )
    assert settlement_of(used_on(lease, 640, reservation_id="req_1")) is None
    assert settlement_of(used_on(lease, 640, lease_id="")) is None
    with pytest.raises(ValueError, match="negative"):
        settlement_of(used_on(lease, -1, lease_id="", reservation_id="req_1"))
    # Nothing delivered: no usage, and the hold is released.
    failed = used_on(lease, 0, lease_id="", reservation_id="req_2", end_reason="upstream_error")
    assert settlement_of(failed) == ExactSettlement("req_2", None, 0, "upstream_error")
    with pytest.raises(ValueError, match="without usage"):
        settlement_of(used_on(lease, 3, lease_id="", reservation_id="req_2"))
    # An absurd report is bounded rather than refused: the cost is what is charged.
    absurd = used_on(
        lease, 5, lease_id="", reservation_id="r", usage=Usage(prompt_tokens=2, cached_prompt_tokens=9)
    )
    assert settlement_of(absurd) == ExactSettlement(
        "r", PricedUsage(prompt_tokens=2, cached_prompt_tokens=2), 5
    )


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        pytest.param({"user_id": ""}, "no user_id", id="no user"),
        pytest.param({"cost_micros": -1}, "negative", id="negative cost"),
        pytest.param({"aggregated": 3}, "summary", id="summary naming a lease"),
    ],
)
def test_an_event_naming_a_lease_that_cannot_be_a_charge_is_refused(
    fields: dict[str, Any], reason: str
) -> None:
    with pytest.raises(ValueError, match=reason):
        charge_of(used_on(LeaseAsk("lse_1", "k_1", "u_1", 100, 1), 10, **fields))


# --- against Kafka and PostgreSQL -----------------------------------------------------------------------


async def test_leased_events_are_charged_once_each_and_the_rest_passed_over(
    settle_settings: SettlingSettings, store: CreditStore, ledger: Ledger, database: Database
) -> None:
    lease = await open_lease(store, ledger)
    leased = [used_on(lease, 1_000 + i) for i in range(30)] + [used_on(lease, 0)]
    exact = [used_on(lease, 700, lease_id="", reservation_id=new_id("rsv")) for _ in range(3)]
    refusals = UsageEvent(event_id=new_id("refusals"), occurred_at_ms=1, aggregated=12, status_code=401)
    topic = UsageTopic(settle_settings)
    before = {name: records(name) for name in ("charged", "no_hold", "invalid", "undecodable")}
    async with settling(settle_settings, store, ledger):
        await topic.produce([*leased[:10], b"\xff not a usage event", *exact, refusals, *leased[10:]])
        await charged_all(database, lease, leased)
        await committed_all(topic)

    # Only the leased events are charges, each once; the zero cost changes nothing; the events naming
    # reservations quota does not know charge nothing.
    total = sum(e.cost_micros for e in leased)
    balance = await ledger.balance(lease.user_id, consistent=True)
    assert (balance.balance_micros, balance.reserved_micros) == (1_000_000 - total, 100_000 - total)
    async with database.reader(consistent=True) as session:
        row = await session.get(models.Reservation, lease.lease_id)
        assert row is not None and (row.applied_micros, row.charged_micros) == (total, total)
        stray = await session.scalars(
            select(models.LedgerEntry.reservation_id).where(
                models.LedgerEntry.reservation_id.in_([e.event_id for e in exact])
            )
        )
        assert list(stray.all()) == []
    # The zero cost is read but changes nothing; reservations quota never held are passed over.
    assert records("charged") - before["charged"] == len(leased) - 1
    assert records("no_hold") - before["no_hold"] == 1
    assert records("invalid") - before["invalid"] == len(exact)
    assert records("undecodable") - before["undecodable"] == 1
    await clean(ledger)


async def test_the_same_events_produced_twice_are_charged_once(
    settle_settings: SettlingSettings, store: CreditStore, ledger: Ledger, database: Database
) -> None:
    lease = await open_lease(store, ledger)
    events = [used_on(lease, 2_000 + i) for i in range(20)]
    topic = UsageTopic(settle_settings)
    async with settling(settle_settings, store, ledger):
        await topic.produce(events)
        await topic.produce(reversed(events))
        await charged_all(database, lease, events)
        await committed_all(topic)
    assert await charges_on(database, lease) == expected(events)
    balance = await ledger.balance(lease.user_id, consistent=True)
    assert balance.balance_micros == 1_000_000 - sum(e.cost_micros for e in events)
    await clean(ledger)


async def test_a_restarted_consumer_resumes_from_its_committed_offsets(
    settle_settings: SettlingSettings, store: CreditStore, ledger: Ledger, database: Database
) -> None:
    lease = await open_lease(store, ledger)
    first = [used_on(lease, 100 + i) for i in range(10)]
    later = [used_on(lease, 300 + i) for i in range(10)]
    topic = UsageTopic(settle_settings)
    async with settling(settle_settings, store, ledger):
        await topic.produce(first)
        await charged_all(database, lease, first)
        await committed_all(topic)
    # Produced while no member of the group runs.
    await topic.produce(later)
    unchanged = records("unchanged")
    async with settling(settle_settings, store, ledger):
        await charged_all(database, lease, [*first, *later])
        await committed_all(topic)
    # Nothing of the first run was read again: it was committed.
    assert records("unchanged") == unchanged
    await clean(ledger)


async def test_offsets_are_committed_only_after_the_charges_through_a_database_outage(
    settle_settings: SettlingSettings,
    ledger: Ledger,
    database: Database,
    migrated_db: DbUrls,
    clock: ManualClock,
) -> None:
    lease = await open_lease(CreditStore(database, Calendar(), TERMS, clock), ledger)
    gate = TcpGate.for_url(migrated_db.primary)
    await gate.open()
    gated = Database(
        migrated_db.settings(database_url=gate.url(migrated_db.primary), database_replica_urls=[])
    )
    await gated.start()
    store = CreditStore(gated, Calendar(), TERMS, clock)
    events = [used_on(lease, 1_000 + i) for i in range(25)]
    topic = UsageTopic(settle_settings)
    failures = REGISTRY.get_sample_value("relaygate_quota_settle_write_failures_total") or 0.0
    try:
        await gate.close()
        async with settling(settle_settings, store, ledger):
            await topic.produce(events)

            async def failing() -> bool:
                failed = REGISTRY.get_sample_value("relaygate_quota_settle_write_failures_total") or 0.0
                return failed >= failures + 2

            await eventually(failing, timeout=WAIT_S, what="charging to fail against the closed gate")
            assert await topic.uncommitted() == len(events)
            assert await charges_on(database, lease) == []
        # Stopped while the database was still down: the last batch stays uncommitted, never skipped.
        assert await topic.uncommitted() == len(events)

        await gate.open()
        async with settling(settle_settings, store, ledger):
            await charged_all(database, lease, events)
            await committed_all(topic)
        assert await charges_on(database, lease) == expected(events)
        await clean(ledger)
    finally:
        await gate.close()
        await gated.close()


async def test_a_charge_the_books_refuse_does_not_hold_up_its_batch(
    settle_settings: SettlingSettings, store: CreditStore, ledger: Ledger, database: Database
) -> None:
    lease = await open_lease(store, ledger)
    good = [used_on(lease, 500 + i) for i in range(8)]
    # A request id longer than the ledger holds: CreditStore refuses the charge, whatever batch it is in.
    refused = used_on(lease, 900, event_id="req_" + "x" * 100)
    topic = UsageTopic(settle_settings)
    invalid = records("invalid")
    async with settling(settle_settings, store, ledger):
        await topic.produce([*good[:4], refused, *good[4:]])
        await charged_all(database, lease, good)
        await committed_all(topic)
    assert records("invalid") == invalid + 1
    await clean(ledger)


async def test_two_members_of_the_group_share_the_topic_and_charge_each_event_once(
    settle_settings: SettlingSettings,
    store: CreditStore,
    ledger: Ledger,
    database: Database,
    migrated_db: DbUrls,
) -> None:
    leases = [await open_lease(store, ledger) for _ in range(4)]
    events = [used_on(leases[i % 4], 100 + i) for i in range(80)]
    topic = UsageTopic(settle_settings)
    other = Database(migrated_db.settings())
    await other.start()
    try:
        async with settling(settle_settings, store, ledger):
            await topic.produce(events[:20])
            # A second quota process joins (a rebalance), then leaves while events keep coming.
            async with settling(
                settle_settings, CreditStore(other, Calendar(), TERMS, ManualClock()), ledger
            ):
                await topic.produce(events[20:50])
                await asyncio.sleep(0.5)
            await topic.produce(events[50:])
            for lease in leases:
                await charged_all(database, lease, [e for e in events if e.lease_id == lease.lease_id])
            await committed_all(topic)
    finally:
        await other.close()
    await clean(ledger)


async def test_an_unreachable_broker_neither_blocks_nor_delays_quota(
    store: CreditStore, ledger: Ledger
) -> None:
    # Nothing listens on port 1: every attempt fails at once and is retried until the context closes.
    settings = SettlingSettings.model_validate({"kafka_bootstrap": "127.0.0.1:1", "settle_group_id": "g"})
    started = time.monotonic()
    async with settling(settings, store, ledger):
        await asyncio.sleep(1.0)
    assert time.monotonic() - started < 3.0


async def test_the_quota_service_settles_leases_while_it_serves(
    settle_settings: SettlingSettings,
    store: CreditStore,
    ledger: Ledger,
    database: Database,
    migrated_db: DbUrls,
) -> None:
    lease = await open_lease(store, ledger)
    events = [used_on(lease, 700 + i) for i in range(10)]
    topic = UsageTopic(settle_settings)
    settings = QuotaSettings.model_validate(
        {
            **settle_settings.model_dump(),
            "database_url": migrated_db.primary,
            "quota_listen": "127.0.0.1:0",
            "grpc_tls_dir": tls_dir("quota"),
            "grpc_drain_seconds": 0.5,
        }
    )
    async with in_process(run, settings, timeout=20):
        await topic.produce(events)
        await charged_all(database, lease, events)
        await committed_all(topic)
    await clean(ledger)


# --- exact reservations settled by their events -----------------------------------------------------------


async def reserve_exact(ledger: Ledger, prices: PriceBook, *, limit: int = 0) -> tuple[Hold, str]:
    """An exact reservation of a funded user, its key limited to ``limit`` requests at once."""
    price = await priced_model(prices, input_per_mtok=1_000_000, output_per_mtok=2_000_000)
    user = await funded_user(ledger, 1_000_000)
    key = new_id("k")
    hold = await ledger.reserve(
        reservation_id=new_id("req"),
        user_id=user,
        key_id=key,
        model=price.model,
        prompt_tokens=100,
        max_output_tokens=100,
        key_limits=Limits(max_concurrency=limit),
    )
    assert hold.reserved_micros == 300
    return hold, key


def exact_event(hold: Hold, key: str, cost: int) -> UsageEvent:
    """The usage event a relay publishes for an exact reservation, with the cost it computed."""
    return UsageEvent(
        event_id=hold.reservation_id,
        occurred_at_ms=int(time.time() * 1000),
        key_id=key,
        user_id=hold.user_id,
        model=hold.price.model,
        status_code=200,
        usage=Usage(prompt_tokens=100, completion_tokens=50),
        cost_micros=cost,
        price_id=hold.price.price_id,
        reservation_id=hold.reservation_id,
    )


async def finished(db: Database, hold: Hold) -> models.Reservation:
    async def done() -> bool:
        async with db.reader(consistent=True) as session:
            row = await session.get(models.Reservation, hold.reservation_id)
            return row is not None and row.state != models.HELD

    await eventually(done, timeout=WAIT_S, what="the reservation to be settled by its event")
    async with db.reader(consistent=True) as session:
        row = await session.get(models.Reservation, hold.reservation_id)
        assert row is not None
        return row


async def entries_of(db: Database, hold: Hold) -> list[int]:
    async with db.reader(consistent=True) as session:
        rows = await session.scalars(
            select(models.LedgerEntry.amount_micros).where(
                models.LedgerEntry.reservation_id == hold.reservation_id
            )
        )
        return [int(amount) for amount in rows.all()]


async def test_an_exact_reservation_is_settled_by_its_event_and_frees_its_slot(
    settle_settings: SettlingSettings,
    store: CreditStore,
    ledger: Ledger,
    prices: PriceBook,
    database: Database,
) -> None:
    hold, key = await reserve_exact(ledger, prices, limit=1)

    async def second() -> Hold:
        return await ledger.reserve(
            reservation_id=new_id("req"),
            user_id=hold.user_id,
            key_id=key,
            model=hold.price.model,
            prompt_tokens=100,
            key_limits=Limits(max_concurrency=1),
        )

    with pytest.raises(ConcurrencyLimited):
        await second()
    topic = UsageTopic(settle_settings)
    settled = records("settled")
    async with settling(settle_settings, store, ledger):
        # No Settle: the event alone settles it, at the cost it carries (not re-priced from its usage).
        await topic.produce([exact_event(hold, key, 250)])
        row = await finished(database, hold)
        await committed_all(topic)
    assert (row.state, row.charged_micros) == (models.SETTLED, 250)
    assert await entries_of(database, hold) == [-250]
    balance = await ledger.balance(hold.user_id, consistent=True)
    assert (balance.balance_micros, balance.reserved_micros) == (1_000_000 - 250, 0)
    assert records("settled") == settled + 1
    # Its concurrency slot was given back with the settlement.
    await second()
    await clean(ledger)


async def test_duplicate_events_and_an_older_relays_settle_charge_an_exact_reservation_once(
    settle_settings: SettlingSettings,
    store: CreditStore,
    ledger: Ledger,
    prices: PriceBook,
    database: Database,
) -> None:
    twice, key = await reserve_exact(ledger, prices)
    rpc_first, rpc_key = await reserve_exact(ledger, prices)
    unused, unused_key = await reserve_exact(ledger, prices)
    nothing = exact_event(unused, unused_key, 0)
    nothing.ClearField("usage")
    # An older relay settles by RPC, then publishes the event of what it charged.
    outcome = await ledger.settle(
        rpc_first.reservation_id, PricedUsage(prompt_tokens=100, completion_tokens=50)
    )
    assert outcome.charged_micros == 200
    events = [exact_event(twice, key, 180), exact_event(rpc_first, rpc_key, outcome.charged_micros), nothing]
    topic = UsageTopic(settle_settings)
    async with settling(settle_settings, store, ledger):
        await topic.produce(events)
        await topic.produce(events)
        await finished(database, twice)
        await committed_all(topic)
    assert await entries_of(database, twice) == [-180]
    assert await entries_of(database, rpc_first) == [-200]
    # The request that delivered nothing is released: no charge, no entry, its hold given back.
    released = await finished(database, unused)
    assert (released.state, released.charged_micros) == (models.RELEASED, 0)
    assert await entries_of(database, unused) == []
    assert (await ledger.balance(unused.user_id, consistent=True)).reserved_micros == 0
    # A Settle arriving after the event changes nothing either.
    late = await ledger.settle(twice.reservation_id, PricedUsage(prompt_tokens=100, completion_tokens=100))
    assert (late.repeated, late.charged_micros) == (True, 180)
    assert await entries_of(database, twice) == [-180]
    await clean(ledger)


# --- late charges: events that reach quota after their reservation expired or was released ----------------

# 1 unit/Mtok in, 2 out: 100 prompt + 100 output tokens hold 300, and the relay logged 250.
COST = 250


async def reserve(ledger: Ledger, price: Price, user: str, key: str, *, max_output_tokens: int = 100) -> Hold:
    return await ledger.reserve(
        reservation_id=new_id("req"),
        user_id=user,
        key_id=key,
        model=price.model,
        prompt_tokens=100,
        max_output_tokens=max_output_tokens,
    )


async def expired(ledger: Ledger, clock: ManualClock, database: Database, hold: Hold) -> None:
    """Let the sweeper expire ``hold`` (its event has not come)."""
    clock.advance(TTL_S)
    await ledger.expire_due()
    row = await reservation(database, hold)
    assert (row.state, row.charged_micros) == (models.EXPIRED, 0)


async def reservation(db: Database, hold: Hold) -> models.Reservation:
    async with db.reader(consistent=True) as session:
        row = await session.get(models.Reservation, hold.reservation_id)
    assert row is not None
    return row


async def ledger_rows(db: Database, hold: Hold) -> list[tuple[int, int, str]]:
    """(amount, written off, flags) of every ledger entry of the request."""
    async with db.reader(consistent=True) as session:
        rows = await session.execute(
            select(
                models.LedgerEntry.amount_micros,
                models.LedgerEntry.written_off_micros,
                models.LedgerEntry.flags,
            ).where(models.LedgerEntry.reservation_id == hold.reservation_id)
        )
        return [(int(a), int(w), str(f)) for a, w, f in rows.all()]


async def settled_late(
    settings: SettlingSettings, store: CreditStore, ledger: Ledger, database: Database, *events: UsageEvent
) -> None:
    """Produce ``events`` (twice: a replay) and wait until each request has its ledger entry and the
    group has committed every offset."""
    topic = UsageTopic(settings)
    async with settling(settings, store, ledger):
        await topic.produce(events)
        await topic.produce(events)

        async def charged() -> bool:
            async with database.reader(consistent=True) as session:
                found = await session.scalars(
                    select(models.LedgerEntry.reservation_id).where(
                        models.LedgerEntry.reservation_id.in_([e.reservation_id for e in events])
                    )
                )
                return len(found.all()) == len(events)

        await eventually(charged, timeout=WAIT_S, what="the late events to be charged")
        await committed_all(topic)


def written_off_total() -> float:
    return REGISTRY.get_sample_value("relaygate_quota_written_off_micros_total") or 0.0


async def test_an_event_after_the_sweeper_expired_its_reservation_is_charged_once_from_the_free_balance(
    settle_settings: SettlingSettings,
    store: CreditStore,
    ledger: Ledger,
    prices: PriceBook,
    database: Database,
    clock: ManualClock,
) -> None:
    price = await priced_model(prices)
    user = await funded_user(ledger, 10_000)
    key = new_id("k")
    hold = await reserve(ledger, price, user, key)
    await expired(ledger, clock, database, hold)
    # Expiry charges nothing and leaves the request's ledger entry to its event.
    assert await ledger_rows(database, hold) == []
    late = records("late")

    await settled_late(settle_settings, store, ledger, database, exact_event(hold, key, COST))

    assert await ledger_rows(database, hold) == [(-COST, 0, "late,beyond_hold")]
    row = await reservation(database, hold)
    assert (row.state, row.charged_micros, row.usage["completion_tokens"]) == (models.EXPIRED, COST, 50)
    balance = await ledger.balance(user, consistent=True)
    assert (balance.balance_micros, balance.reserved_micros) == (10_000 - COST, 0)
    # The replay in the same topic changed nothing; a Settle arriving now gets what the event charged.
    assert records("late") == late + 1
    settle = await ledger.settle(hold.reservation_id, PricedUsage(prompt_tokens=100, completion_tokens=100))
    assert (settle.repeated, settle.state, settle.charged_micros) == (True, models.EXPIRED, COST)
    assert settle.flags == ("expired", "late", "beyond_hold")
    assert await ledger_rows(database, hold) == [(-COST, 0, "late,beyond_hold")]
    await clean(ledger)


async def test_a_late_event_the_free_balance_cannot_cover_is_charged_in_part_and_the_rest_written_off(
    settle_settings: SettlingSettings,
    store: CreditStore,
    ledger: Ledger,
    prices: PriceBook,
    database: Database,
    clock: ManualClock,
) -> None:
    price = await priced_model(prices)
    user = await funded_user(ledger, 1_000)
    key = new_id("k")
    hold = await reserve(ledger, price, user, key)
    await expired(ledger, clock, database, hold)
    # Meanwhile another request holds 900 of the 1000: 100 are free when the late event comes.
    other = await reserve(ledger, price, user, key, max_output_tokens=400)
    assert other.reserved_micros == 900
    written_off = written_off_total()

    await settled_late(settle_settings, store, ledger, database, exact_event(hold, key, COST))

    assert await ledger_rows(database, hold) == [(-100, COST - 100, "late,beyond_hold,written_off")]
    assert (await reservation(database, hold)).charged_micros == 100
    # The other hold is untouched: a late charge never takes what is held for someone else.
    balance = await ledger.balance(user, consistent=True)
    assert (balance.balance_micros, balance.reserved_micros) == (900, 900)
    assert written_off_total() == written_off + COST - 100
    await clean(ledger)
    await ledger.release(other.reservation_id)
    await clean(ledger)


async def test_a_late_charge_counts_against_the_budget_windows_of_its_reservation(
    settle_settings: SettlingSettings,
    store: CreditStore,
    ledger: Ledger,
    prices: PriceBook,
    database: Database,
    clock: ManualClock,
) -> None:
    price = await priced_model(prices)
    user = await funded_user(ledger, 100_000)
    key = new_id("k")
    await Budgets(database, clock=clock, calendar=Calendar()).set_budget(
        scope="key", scope_id=key, period="day", limit_micros=1_000
    )
    # Both in one day's window: the second is held within the TTL of the first's expiry.
    clock.now = 1_700_006_400.0
    hold = await reserve(ledger, price, user, key)
    await expired(ledger, clock, database, hold)
    other = await reserve(ledger, price, user, key, max_output_tokens=400)
    day_start = Calendar().windows(clock.time())[0]

    await settled_late(settle_settings, store, ledger, database, exact_event(hold, key, COST))

    # The balance could pay it all; the key's daily budget has 1000 - 900 held = 100 left.
    assert await ledger_rows(database, hold) == [(-100, COST - 100, "late,beyond_hold,written_off")]
    async with database.reader(consistent=True) as session:
        window = await session.get(models.BudgetUsage, ("key", key, "day", day_start))
        assert window is not None
        assert (window.spent_micros, window.reserved_micros) == (100, 900)
    await ledger.release(other.reservation_id)
    await clean(ledger)


async def test_an_event_with_usage_for_a_released_reservation_is_charged_late(
    settle_settings: SettlingSettings,
    store: CreditStore,
    ledger: Ledger,
    prices: PriceBook,
    database: Database,
) -> None:
    price = await priced_model(prices)
    user = await funded_user(ledger, 10_000)
    key = new_id("k")
    hold = await reserve(ledger, price, user, key)
    # Released as if nothing had been delivered; the event says something was: it is the truth.
    await ledger.release(hold.reservation_id, "client went away")
    assert await ledger_rows(database, hold) == []

    await settled_late(settle_settings, store, ledger, database, exact_event(hold, key, COST))

    assert await ledger_rows(database, hold) == [(-COST, 0, "late,beyond_hold")]
    row = await reservation(database, hold)
    assert (row.state, row.charged_micros) == (models.RELEASED, COST)
    assert (await ledger.balance(user, consistent=True)).balance_micros == 10_000 - COST
    await clean(ledger)


async def test_concurrent_late_events_and_settles_of_one_request_charge_it_once(
    ledger: Ledger, prices: PriceBook, database: Database, clock: ManualClock
) -> None:
    price = await priced_model(prices)
    user = await funded_user(ledger, 10_000)
    key = new_id("k")
    hold = await reserve(ledger, price, user, key)
    await expired(ledger, clock, database, hold)
    usage = PricedUsage(prompt_tokens=100, completion_tokens=50)

    # Two consumers replaying the event during a rebalance, and an older relay's Settle.
    outcomes = await asyncio.gather(
        *(ledger.settle_charged(hold.reservation_id, usage, COST) for _ in range(6)),
        ledger.settle(hold.reservation_id, usage),
    )

    assert sum(1 for o in outcomes if not o.repeated) == 1
    assert await ledger_rows(database, hold) == [(-COST, 0, "late,beyond_hold")]
    assert (await ledger.balance(user, consistent=True)).balance_micros == 10_000 - COST
    await clean(ledger)


async def test_late_charges_of_one_user_in_one_batch_share_what_is_free_and_charge_a_repeat_once(
    ledger: Ledger, prices: PriceBook, database: Database, clock: ManualClock
) -> None:
    price = await priced_model(prices)
    user = await funded_user(ledger, 700)
    other_user = await funded_user(ledger, 10_000)
    first = await reserve(ledger, price, user, new_id("k"))
    second = await reserve(ledger, price, other_user, new_id("k"))
    clock.advance(TTL_S)
    await ledger.expire_due()
    third = await reserve(ledger, price, other_user, new_id("k"))
    await ledger.release(third.reservation_id)
    late = LateCharges(database, allow_overage=False)
    usage = PricedUsage(prompt_tokens=100, completion_tokens=50)

    # The first call runs alone; the rest queue behind it and share the next transaction, the
    # second event twice.
    outcomes = await asyncio.gather(
        late.charge(first.reservation_id, usage, COST, int(clock.time())),
        late.charge(second.reservation_id, usage, COST, int(clock.time())),
        late.charge(second.reservation_id, usage, COST, int(clock.time())),
        late.charge(third.reservation_id, usage, COST, int(clock.time())),
    )
    await late.close()

    assert [(o.repeated, o.charged_micros, o.written_off_micros) for o in outcomes] == [
        (False, COST, 0),
        (False, COST, 0),
        (True, COST, 0),
        (False, COST, 0),
    ]
    for hold in (first, second, third):
        assert await ledger_rows(database, hold) == [(-COST, 0, "late,beyond_hold")]
    assert (await ledger.balance(other_user, consistent=True)).balance_micros == 10_000 - 2 * COST
    # Of the 450 left to the first user, another request holds 300: the 150 free cover part of
    # another late event, once.
    fourth = await reserve(ledger, price, user, new_id("k"))
    await ledger.release(fourth.reservation_id)
    blocker = await reserve(ledger, price, user, new_id("k"))
    again = await asyncio.gather(
        *(ledger.settle_charged(fourth.reservation_id, usage, COST) for _ in range(3))
    )
    assert sorted((o.repeated, o.charged_micros, o.written_off_micros) for o in again) == [
        (False, 150, COST - 150),
        (True, 150, 0),
        (True, 150, 0),
    ]
    balance = await ledger.balance(user, consistent=True)
    assert (balance.balance_micros, balance.reserved_micros) == (300, 300)
    await ledger.release(blocker.reservation_id)
    await clean(ledger)


async def test_a_late_event_without_usage_or_cost_charges_nothing(
    ledger: Ledger, prices: PriceBook, database: Database, clock: ManualClock
) -> None:
    price = await priced_model(prices)
    user = await funded_user(ledger, 10_000)
    key = new_id("k")
    hold = await reserve(ledger, price, user, key)
    await expired(ledger, clock, database, hold)

    nothing = await ledger.release(hold.reservation_id, "nothing delivered")
    free = await ledger.settle_charged(hold.reservation_id, PricedUsage(prompt_tokens=1), 0)

    assert (nothing.repeated, free.repeated, free.charged_micros) == (True, True, 0)
    assert await ledger_rows(database, hold) == []
    await clean(ledger)


async def test_a_reservation_expired_with_a_zero_entry_before_late_charges_stays_uncharged(
    ledger: Ledger, prices: PriceBook, database: Database, clock: ManualClock
) -> None:
    price = await priced_model(prices)
    user = await funded_user(ledger, 10_000)
    key = new_id("k")
    hold = await reserve(ledger, price, user, key)
    await expired(ledger, clock, database, hold)
    # What expiry wrote before late charges existed: the request's one entry, charging 0.
    async with database.transaction() as session:
        await session.execute(
            insert(models.LedgerEntry).values(
                user_id=user,
                kind="charge",
                amount_micros=0,
                reservation_id=hold.reservation_id,
                hold_id=hold.reservation_id,
                price_id=hold.price.price_id,
                flags="expired",
                created_at=int(clock.time()),
            )
        )

    outcome = await ledger.settle_charged(hold.reservation_id, PricedUsage(prompt_tokens=100), COST)

    assert (outcome.repeated, outcome.charged_micros, outcome.flags) == (True, 0, ("expired",))
    assert await ledger_rows(database, hold) == [(0, 0, "expired")]
    await clean(ledger)


async def test_reconcile_reports_a_write_off_that_is_no_late_charge(
    ledger: Ledger, database: Database
) -> None:
    user = await funded_user(ledger, 1_000)
    bad = {
        "user_id": user,
        "kind": "charge",
        "amount_micros": 0,
        "reservation_id": new_id("req"),
        "hold_id": None,
        "flags": "",
        "created_at": 1,
        "written_off_micros": 70,
    }
    async with database.transaction() as session:
        entry_id = (
            await session.execute(insert(models.LedgerEntry).values(bad).returning(models.LedgerEntry.id))
        ).scalar_one()
    try:
        found = await ledger.reconcile(consistent=True)
        assert [(d.kind, d.subject, d.stored_micros, d.expected_micros) for d in found] == [
            ("write_off", str(entry_id), 70, 0)
        ]
    finally:
        async with database.transaction() as session:
            await session.execute(delete(models.LedgerEntry).where(models.LedgerEntry.id == entry_id))
    await clean(ledger)


async def test_late_charges_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'relaygate.db'}"
    await upgrade(url)
    db = Database(DatabaseSettings(database_url=url))
    await db.start()
    try:
        clock = ManualClock()
        prices = PriceBook(db, clock=clock, cache_ttl_s=2.0)
        ledger = Ledger(db, prices, clock=clock, reservation_ttl_s=TTL_S)
        price = await priced_model(prices)
        user = await funded_user(ledger, 1_000)
        hold = await reserve(ledger, price, user, new_id("k"))
        await expired(ledger, clock, db, hold)
        await reserve(ledger, price, user, new_id("k"), max_output_tokens=400)

        outcome = await ledger.settle_charged(hold.reservation_id, PricedUsage(prompt_tokens=100), COST)
        again = await ledger.settle_charged(hold.reservation_id, PricedUsage(prompt_tokens=100), COST)

        assert (outcome.repeated, outcome.charged_micros, outcome.written_off_micros) == (False, 100, 150)
        assert (again.repeated, again.charged_micros) == (True, 100)
        assert await ledger_rows(db, hold) == [(-100, 150, "late,beyond_hold,written_off")]
        assert await ledger.reconcile(consistent=True) == []
        await ledger.close()
    finally:
        await db.close()
