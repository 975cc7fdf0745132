"""Settlement from the usage stream: quota's consumer of the usage topic charges leases and settles exact
reservations from usage events.

Real Apache Kafka and PostgreSQL (primary + replica): events are produced to a topic of this test's
own, consumed in a group of its own by :func:`services.quota.settling.settling` (as quota's lifespan
runs it), and charged by a real :class:`~services.quota.leasing.CreditStore`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition
from prometheus_client import REGISTRY
from sqlalchemy import select

from devinfra.backing import BackingServices
from services.common.clock import ManualClock
from services.common.credit import Charge, CreditTerms, LeaseAsk, SyncRequest
from services.common.db import Database
from services.common.errors import ConcurrencyLimited
from services.common.events import encode
from services.common.ids import new_id
from services.common.pb.relaygate.common.v1.types_pb2 import Usage
from services.common.pb.relaygate.events.v1.events_pb2 import UsageEvent
from services.common.pricing import Usage as PricedUsage
from services.quota import models
from services.quota.app import run
from services.quota.budgets import Calendar
from services.quota.leasing import CreditStore
from services.quota.ledger import Hold, Ledger
from services.quota.limits import Limits
from services.quota.pricing import PriceBook
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
