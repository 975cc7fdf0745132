"""Leases on the primary: syncs, charges from the usage stream, expiry and recall, with the books
reconciled after each (real PostgreSQL primary + replica)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import select, update

from services.common.clock import ManualClock
from services.common.credit import Charge, CreditTerms, LeaseAsk, LeaseReport, SyncRequest
from services.common.db import Database
from services.common.errors import CreditRecalled, InsufficientQuota, InvalidRequest, NotFound, QuotaError
from services.common.ids import new_id
from services.quota import models
from services.quota.budgets import Budgets, Calendar
from services.quota.leasing import CreditStore
from services.quota.ledger import Ledger
from services.quota.pricing import Price, PriceBook, Usage
from tests.db_fixtures import DbUrls
from tests.quota.factories import funded_user, priced_model
from tests.quota.fixtures import TTL_S

TERMS = CreditTerms(sync_interval_ms=1_000, valid_for_ms=30_000, grace_ms=5_000, horizon_ms=60_000)
# Past a lease's validity and grace: the next expiry gives it up.
LAPSE_S = (TERMS.valid_for_ms + TERMS.grace_ms) / 1000 + 1


@pytest.fixture
def store(database: Database, clock: ManualClock) -> CreditStore:
    return CreditStore(database, Calendar(), TERMS, clock)


@pytest.fixture
def exact(database: Database, prices: PriceBook, clock: ManualClock, store: CreditStore) -> Ledger:
    """The exact path, recalling leases through ``store`` when a Reserve cannot be covered."""
    return Ledger(database, prices, clock=clock, reservation_ttl_s=TTL_S, credit=store)


@pytest.fixture
async def other_db(migrated_db: DbUrls) -> AsyncIterator[Database]:
    """A second quota process's connection pools on the same primary."""
    db = Database(migrated_db.settings())
    await db.start()
    try:
        yield db
    finally:
        await db.close()


def ask(user: str, *, key: str = "", want: int = 100_000, least: int = 1_000) -> LeaseAsk:
    return LeaseAsk(new_id("lse"), key or new_id("k"), user, want, least)


def charge(lease: LeaseAsk, cost: int, request_id: str = "") -> Charge:
    return Charge(request_id or new_id("req"), lease.lease_id, lease.key_id, lease.user_id, cost)


async def hold_row(db: Database, hold_id: str) -> models.Reservation:
    async with db.reader(consistent=True) as session:
        row = await session.get(models.Reservation, hold_id)
    assert row is not None
    return row


async def charges_of(db: Database, hold_id: str) -> list[models.LedgerEntry]:
    async with db.reader(consistent=True) as session:
        rows = await session.scalars(
            select(models.LedgerEntry)
            .where(models.LedgerEntry.hold_id == hold_id)
            .order_by(models.LedgerEntry.id)
        )
        return list(rows.all())


async def held(ledger: Ledger, user: str) -> int:
    return (await ledger.balance(user, consistent=True)).reserved_micros


async def clean(ledger: Ledger) -> None:
    assert [d.describe() for d in await ledger.reconcile(consistent=True)] == []


async def opened(store: CreditStore, relay: str, lease: LeaseAsk, seq: int = 1) -> int:
    [grant] = (await store.sync(SyncRequest(relay, seq, asks=(lease,)))).grants
    assert grant.state == "open", grant
    return grant.granted_micros


async def test_a_lease_is_granted_as_a_hold_and_grows_with_syncs(
    store: CreditStore, ledger: Ledger, database: Database
) -> None:
    user = await funded_user(ledger, 1_000_000)
    first = ask(user)
    [grant] = (await store.sync(SyncRequest("relay-a", 1, asks=(first,)))).grants
    assert (grant.lease_id, grant.state, grant.granted_micros) == (first.lease_id, "open", 100_000)
    assert grant.valid_for_ms == TERMS.valid_for_ms
    assert await held(ledger, user) == 100_000
    row = await hold_row(database, first.lease_id)
    assert (row.kind, row.state, row.phase, row.reserved_micros, row.model, row.price_id) == (
        "lease",
        "held",
        "open",
        100_000,
        "",
        0,
    )
    await clean(ledger)

    # The same ask again (its answer was lost) finds the lease instead of opening a second one.
    [again] = (await store.sync(SyncRequest("relay-a", 2, asks=(first,)))).grants
    assert (again.state, again.granted_micros) == ("open", 100_000)
    report = LeaseReport(first.lease_id, used_micros=0, inflight_micros=10_000, want_micros=50_000)
    [grown] = (await store.sync(SyncRequest("relay-a", 3, reports=(report,)))).grants
    assert (grown.state, grown.granted_micros) == ("open", 150_000)
    assert await held(ledger, user) == 150_000
    # Another relay naming the lease learns nothing and changes nothing.
    [foreign] = (await store.sync(SyncRequest("relay-b", 9, reports=(report,)))).grants
    assert foreign.state == "closed"
    assert await held(ledger, user) == 150_000
    await clean(ledger)


async def test_small_balances_get_no_lease(store: CreditStore, ledger: Ledger) -> None:
    user = await funded_user(ledger, 7_000)
    # Half of 7,000 is below four worst cases of 1,000: the key stays on exact reservations.
    [grant] = (await store.sync(SyncRequest("relay-a", 1, asks=(ask(user),)))).grants
    assert grant.state == "refused"
    [nobody] = (await store.sync(SyncRequest("relay-a", 2, asks=(ask(new_id("u")),)))).grants
    assert nobody.state == "refused"
    assert await held(ledger, user) == 0
    await clean(ledger)


async def test_leases_hold_against_the_budgets_of_their_key_and_user(
    store: CreditStore, ledger: Ledger, database: Database, clock: ManualClock
) -> None:
    user = await funded_user(ledger, 1_000_000)
    lease = ask(user)
    budgets = Budgets(database, clock=clock, calendar=Calendar())
    await budgets.set_budget(scope="user", scope_id=user, period="month", limit_micros=60_000)
    await budgets.set_budget(scope="key", scope_id=lease.key_id, period="day", limit_micros=50_000)
    [grant] = (await store.sync(SyncRequest("relay-a", 1, asks=(lease,)))).grants
    # The tightest window (the key's day, 50,000) leaves 25,000 to share.
    assert (grant.state, grant.granted_micros) == ("open", 25_000)
    async with database.reader(consistent=True) as session:
        windows = {
            (w.scope, w.period): (w.spent_micros, w.reserved_micros, w.limit_micros)
            for w in await session.scalars(
                select(models.BudgetUsage).where(models.BudgetUsage.scope_id.in_([user, lease.key_id]))
            )
        }
    assert windows == {("key", "day"): (0, 25_000, 50_000), ("user", "month"): (0, 25_000, 60_000)}
    await clean(ledger)

    [posted] = await store.charge([charge(lease, 10_000)])
    assert (posted.charged, posted.written_off, posted.late) == (10_000, 0, False)
    async with database.reader(consistent=True) as session:
        spent = {
            (w.scope, w.period): (w.spent_micros, w.reserved_micros)
            for w in await session.scalars(
                select(models.BudgetUsage).where(models.BudgetUsage.scope_id.in_([user, lease.key_id]))
            )
        }
    assert spent == {("key", "day"): (10_000, 15_000), ("user", "month"): (10_000, 15_000)}
    await clean(ledger)


async def test_old_and_repeated_syncs_change_nothing(
    store: CreditStore, ledger: Ledger, database: Database
) -> None:
    user = await funded_user(ledger, 1_000_000)
    lease = ask(user)
    granted = await opened(store, "relay-a", lease, seq=1)
    newer = LeaseReport(lease.lease_id, used_micros=5_000, inflight_micros=10_000)
    [grant] = (await store.sync(SyncRequest("relay-a", 5, reports=(newer,)))).grants
    assert grant.granted_micros == granted
    older = LeaseReport(lease.lease_id, used_micros=1_000, inflight_micros=60_000, want_micros=50_000)
    for seq in (5, 4):
        [stale] = (await store.sync(SyncRequest("relay-a", seq, reports=(older,)))).grants
        assert (stale.state, stale.granted_micros) == ("open", granted)
    row = await hold_row(database, lease.lease_id)
    assert (row.seq, row.used_reported_micros, row.inflight_reported_micros) == (5, 5_000, 10_000)
    assert await held(ledger, user) == granted
    await clean(ledger)


async def test_charges_are_idempotent_per_request(
    store: CreditStore, ledger: Ledger, database: Database
) -> None:
    user = await funded_user(ledger, 1_000_000)
    lease = ask(user)
    await opened(store, "relay-a", lease)
    batch = [charge(lease, 4_000), charge(lease, 0), charge(lease, 6_000)]
    posted = await store.charge([*batch, batch[0]])
    # A zero cost is nothing to charge; a repeat within the batch is charged once.
    assert [p.request_id for p in posted] == [batch[0].request_id, batch[2].request_id]
    assert await store.charge(batch) == []
    entries = await charges_of(database, lease.lease_id)
    assert sorted((e.reservation_id, e.amount_micros) for e in entries) == sorted(
        [(batch[0].request_id, -4_000), (batch[2].request_id, -6_000)]
    )
    balance = await ledger.balance(user, consistent=True)
    assert (balance.balance_micros, balance.reserved_micros) == (990_000, 90_000)
    row = await hold_row(database, lease.lease_id)
    assert (row.applied_micros, row.charged_micros, row.reserved_micros) == (10_000, 10_000, 90_000)
    await clean(ledger)


async def test_two_consumers_charging_the_same_events_charge_each_request_once(
    store: CreditStore, ledger: Ledger, database: Database, other_db: Database, clock: ManualClock
) -> None:
    user = await funded_user(ledger, 1_000_000)
    lease = ask(user)
    await opened(store, "relay-a", lease)
    other = CreditStore(other_db, Calendar(), TERMS, clock)
    batch = [charge(lease, 100 + i) for i in range(50)]
    first, second = await asyncio.gather(store.charge(batch), other.charge(list(reversed(batch))))
    assert sorted(p.request_id for p in [*first, *second]) == sorted(c.request_id for c in batch)
    entries = await charges_of(database, lease.lease_id)
    assert sorted(str(e.reservation_id) for e in entries) == sorted(c.request_id for c in batch)
    await clean(ledger)


async def test_two_consumers_charging_for_an_unknown_hold_charge_each_request_once(
    store: CreditStore, ledger: Ledger, database: Database, other_db: Database, clock: ManualClock
) -> None:
    # No row to lock: the two transactions race on the ledger's unique request id instead.
    user = await funded_user(ledger, 1_000_000)
    other = CreditStore(other_db, Calendar(), TERMS, clock)
    spent = 0
    for _ in range(5):
        stray = LeaseAsk(new_id("lse"), new_id("k"), user, 0, 0)
        batch = [charge(stray, 100 + i) for i in range(20)]
        first, second = await asyncio.gather(store.charge(batch), other.charge(list(reversed(batch))))
        assert sorted(p.request_id for p in [*first, *second]) == sorted(c.request_id for c in batch)
        assert all(p.late for p in [*first, *second])
        assert len(await charges_of(database, stray.lease_id)) == 20
        spent += sum(c.cost_micros for c in batch)
    assert (await ledger.balance(user, consistent=True)).balance_micros == 1_000_000 - spent
    await clean(ledger)


async def test_an_ask_repeated_while_the_first_is_in_flight_opens_one_lease(
    store: CreditStore, ledger: Ledger, other_db: Database, clock: ManualClock
) -> None:
    user = await funded_user(ledger, 1_000_000)
    lease = ask(user)
    other = CreditStore(other_db, Calendar(), TERMS, clock)
    answers = await asyncio.gather(
        store.sync(SyncRequest("relay-a", 1, asks=(lease,))),
        other.sync(SyncRequest("relay-a", 1, asks=(lease,))),
    )
    assert [(g.state, g.granted_micros) for a in answers for g in a.grants] == [("open", 100_000)] * 2
    assert await held(ledger, user) == 100_000
    await clean(ledger)


async def test_a_charge_on_an_exact_reservation_is_left_to_its_settle(
    store: CreditStore, ledger: Ledger, prices: PriceBook
) -> None:
    model = await priced_model(prices, per_request=1_000)
    user = await funded_user(ledger, 100_000)
    rid = new_id("rsv")
    await ledger.reserve(reservation_id=rid, user_id=user, model=model.model, prompt_tokens=10)
    assert await store.charge([Charge(rid, rid, "", user, 500)]) == []
    outcome = await ledger.settle(rid, Usage(prompt_tokens=10))
    assert outcome.state == "settled"
    await clean(ledger)


async def test_expiry_keeps_what_was_reported_and_late_charges_beyond_it_are_written_off(
    store: CreditStore, ledger: Ledger, database: Database, clock: ManualClock
) -> None:
    user = await funded_user(ledger, 200_000)
    lease = ask(user)
    assert await opened(store, "relay-a", lease) == 100_000
    report = LeaseReport(lease.lease_id, used_micros=30_000, inflight_micros=20_000)
    await store.sync(SyncRequest("relay-a", 2, reports=(report,)))
    assert await store.expire_due() == 0

    clock.advance(LAPSE_S)
    assert await store.expire_due() >= 1
    # The relay stopped syncing: unused and unreported in-flight credit is released, reported use stays.
    row = await hold_row(database, lease.lease_id)
    assert (row.state, row.phase, row.given_up, row.reserved_micros) == ("held", "expired", True, 30_000)
    assert await held(ledger, user) == 30_000
    await clean(ledger)

    # Take the balance down to what is held, so nothing is free for charges beyond the hold.
    await ledger.top_up(user_id=user, amount_micros=-170_000, reason="test")
    covered, beyond = await store.charge([charge(lease, 30_000), charge(lease, 25_000)])
    assert (covered.charged, covered.written_off, covered.late) == (30_000, 0, True)
    assert (beyond.charged, beyond.written_off, beyond.late) == (0, 25_000, True)
    entries = await charges_of(database, lease.lease_id)
    assert sorted((e.amount_micros, e.written_off_micros, e.flags) for e in entries) == [
        (-30_000, 0, "late"),
        (0, 25_000, "late,written_off"),
    ]
    row = await hold_row(database, lease.lease_id)
    assert (row.state, row.reserved_micros, row.charged_micros) == ("expired", 0, 30_000)
    balance = await ledger.balance(user, consistent=True)
    assert (balance.balance_micros, balance.reserved_micros) == (0, 0)
    [closed] = (await store.sync(SyncRequest("relay-a", 3, reports=(report,)))).grants
    assert closed.state == "closed"
    await clean(ledger)


async def test_an_expired_lease_gives_up_unreported_usage_after_the_horizon(
    store: CreditStore, ledger: Ledger, database: Database, clock: ManualClock
) -> None:
    user = await funded_user(ledger, 200_000)
    lease = ask(user)
    await opened(store, "relay-a", lease)
    await store.sync(SyncRequest("relay-a", 2, reports=(LeaseReport(lease.lease_id, 30_000, 0),)))
    await store.charge([charge(lease, 10_000)])
    clock.advance(LAPSE_S)
    assert await store.expire_due() >= 1
    assert await held(ledger, user) == 20_000
    clock.advance(TERMS.horizon_ms / 1000 + 1)
    assert await store.expire_due() >= 1
    row = await hold_row(database, lease.lease_id)
    assert (row.state, row.reserved_micros, row.charged_micros) == ("expired", 0, 10_000)
    assert await held(ledger, user) == 0
    await clean(ledger)


async def test_a_relay_closing_its_lease_returns_what_it_did_not_use(
    store: CreditStore, ledger: Ledger, database: Database
) -> None:
    user = await funded_user(ledger, 200_000)
    lease = ask(user)
    await opened(store, "relay-a", lease)
    closing = LeaseReport(lease.lease_id, used_micros=12_000, inflight_micros=3_000, closing=True)
    [grant] = (await store.sync(SyncRequest("relay-a", 2, reports=(closing,)))).grants
    assert (grant.state, grant.granted_micros) == ("closing", 15_000)
    await store.charge([charge(lease, 12_000)])
    done = LeaseReport(lease.lease_id, used_micros=12_000, inflight_micros=0, closing=True)
    [grant] = (await store.sync(SyncRequest("relay-a", 3, reports=(done,)))).grants
    assert grant.state == "closed"
    row = await hold_row(database, lease.lease_id)
    assert (row.state, row.reserved_micros, row.charged_micros) == ("settled", 0, 12_000)
    assert await held(ledger, user) == 0
    await clean(ledger)


async def test_a_reserve_the_leases_could_cover_recalls_them_and_is_held_after_they_close(
    store: CreditStore, exact: Ledger, prices: PriceBook
) -> None:
    model = await priced_model(prices, input_per_mtok=0, output_per_mtok=0, per_request=200_000)
    user = await funded_user(exact, 300_000)
    lease = ask(user, want=1_000_000)
    assert await opened(store, "relay-a", lease) == 150_000
    rid = new_id("rsv")
    with pytest.raises(CreditRecalled) as refused:
        await exact.reserve(reservation_id=rid, user_id=user, model=model.model, prompt_tokens=0)
    assert refused.value.retry_after == 2 * TERMS.sync_interval_ms / 1000
    assert refused.value.http_status == 429 and refused.value.code == "credit_recalled"

    # The lease is told to give its credit back and no longer grows; no new lease while it does.
    report = LeaseReport(lease.lease_id, used_micros=0, inflight_micros=0, want_micros=50_000)
    [grant] = (await store.sync(SyncRequest("relay-a", 2, reports=(report,)))).grants
    assert (grant.state, grant.granted_micros, grant.recall) == ("open", 150_000, True)
    [other] = (await store.sync(SyncRequest("relay-b", 1, asks=(ask(user),)))).grants
    assert other.state == "refused"
    with pytest.raises(CreditRecalled):
        await exact.reserve(reservation_id=rid, user_id=user, model=model.model, prompt_tokens=0)

    closing = LeaseReport(lease.lease_id, used_micros=0, inflight_micros=0, closing=True)
    [gone] = (await store.sync(SyncRequest("relay-a", 3, reports=(closing,)))).grants
    assert gone.state == "closed"
    hold = await exact.reserve(reservation_id=rid, user_id=user, model=model.model, prompt_tokens=0)
    assert hold.reserved_micros == 200_000
    await clean(exact)


async def test_a_reserve_even_the_leases_cannot_cover_is_refused_as_before(
    store: CreditStore, exact: Ledger, prices: PriceBook
) -> None:
    model = await priced_model(prices, input_per_mtok=0, output_per_mtok=0, per_request=400_000)
    user = await funded_user(exact, 300_000)
    lease = ask(user, want=1_000_000)
    await opened(store, "relay-a", lease)
    with pytest.raises(InsufficientQuota):
        await exact.reserve(reservation_id=new_id("rsv"), user_id=user, model=model.model, prompt_tokens=0)
    [grant] = (
        await store.sync(SyncRequest("relay-a", 2, reports=(LeaseReport(lease.lease_id, 0, 0),)))
    ).grants
    assert not grant.recall
    await clean(exact)


async def test_settle_and_release_cannot_finish_a_lease(
    store: CreditStore, ledger: Ledger, database: Database
) -> None:
    user = await funded_user(ledger, 200_000)
    lease = ask(user)
    await opened(store, "relay-a", lease)
    with pytest.raises(NotFound):
        await ledger.release(lease.lease_id)
    with pytest.raises(NotFound):
        await ledger.settle(lease.lease_id, Usage(prompt_tokens=1))
    # Nor can the exact path's expiry: leases expire on their own clock.
    await ledger.expire_due(now=10**12)
    assert await held(ledger, user) == 100_000
    assert (await hold_row(database, lease.lease_id)).state == "held"
    await clean(ledger)


@pytest.mark.parametrize(
    "request_",
    [
        SyncRequest("", 1),
        SyncRequest("r" * 65, 1),
        SyncRequest("relay", -1),
        SyncRequest("relay", 1, reports=(LeaseReport("l", -1, 0),)),
        SyncRequest("relay", 1, reports=(LeaseReport("", 0, 0),)),
        SyncRequest("relay", 1, asks=(LeaseAsk("l", "k", "u", -5, 1),)),
        SyncRequest("relay", 1, asks=(LeaseAsk("l", "k", "", 5, 1),)),
        SyncRequest("relay", 1, asks=(LeaseAsk("l" * 65, "k", "u", 5, 1),)),
        SyncRequest("relay", 1, reports=tuple(LeaseReport(f"l{i}", 0, 0) for i in range(10_001))),
    ],
)
async def test_malformed_syncs_are_refused(store: CreditStore, request_: SyncRequest) -> None:
    with pytest.raises(InvalidRequest):
        await store.sync(request_)


async def test_two_quota_processes_syncing_charging_and_reserving_one_user_never_deadlock(
    store: CreditStore, ledger: Ledger, other_db: Database, clock: ManualClock, prices: PriceBook
) -> None:
    other = CreditStore(other_db, Calendar(), TERMS, clock)
    other_ledger = Ledger(
        other_db,
        PriceBook(other_db, clock=clock, cache_ttl_s=2.0),
        clock=clock,
        reservation_ttl_s=TTL_S,
        credit=other,
    )
    model = await priced_model(prices, input_per_mtok=0, output_per_mtok=0, per_request=3_000)
    user = await funded_user(ledger, 400_000)
    rng = random.Random(12)
    relays = [("relay-a", store), ("relay-b", other)]
    leases: dict[str, list[LeaseAsk]] = {name: [] for name, _ in relays}
    used: dict[str, int] = {}
    seqs = {name: 0 for name, _ in relays}

    async def relay_round(name: str, credit: CreditStore) -> None:
        seqs[name] += 1
        reports = tuple(
            LeaseReport(le.lease_id, used.get(le.lease_id, 0), 0, want_micros=rng.choice((0, 20_000)))
            for le in leases[name]
        )
        asks = (ask(user, want=40_000),) if len(leases[name]) < 3 else ()
        answer = await credit.sync(SyncRequest(name, seqs[name], reports=reports, asks=asks))
        for grant in answer.grants:
            if asks and grant.lease_id == asks[0].lease_id and grant.state == "open":
                leases[name].append(asks[0])
        batch = []
        for le in leases[name]:
            cost = rng.randrange(0, 2_000)
            used[le.lease_id] = used.get(le.lease_id, 0) + cost
            batch.append(charge(le, cost))
        await credit.charge(batch)

    async def reserve_round(target: Ledger) -> None:
        rid = new_id("rsv")
        try:
            await target.reserve(reservation_id=rid, user_id=user, model=model.model, prompt_tokens=0)
        except QuotaError:
            return
        await target.settle(rid, Usage())

    for _ in range(12):
        await asyncio.wait_for(
            asyncio.gather(
                relay_round("relay-a", store),
                relay_round("relay-b", other),
                reserve_round(ledger),
                reserve_round(other_ledger),
                store.expire_due(),
                other.expire_due(),
            ),
            timeout=30,
        )
        balance = await ledger.balance(user, consistent=True)
        assert balance.balance_micros >= balance.reserved_micros >= 0
    await other_ledger.close()
    await clean(ledger)


async def test_a_batch_of_500_charges_is_one_transaction(
    store: CreditStore, ledger: Ledger, database: Database
) -> None:
    users = [await funded_user(ledger, 10_000_000) for _ in range(5)]
    leases = [ask(user, want=1_000_000) for user in users]
    await store.sync(SyncRequest("relay-a", 1, asks=tuple(leases)))
    batch = [charge(leases[i % 5], 7) for i in range(500)]
    assert len(await store.charge(batch)) == 500
    for lease in leases:
        row = await hold_row(database, lease.lease_id)
        assert row.applied_micros == 700
    await clean(ledger)


async def test_prices_are_untouched_by_leases(prices: PriceBook) -> None:
    # Leases carry no model or price; the price book never sees them.
    model = await priced_model(prices)
    assert isinstance(await prices.current(model.model), Price)


async def test_reconcile_finds_a_lease_whose_charges_disagree_with_its_entries(
    store: CreditStore, ledger: Ledger, database: Database
) -> None:
    user = await funded_user(ledger, 200_000)
    lease = ask(user)
    await opened(store, "relay-a", lease)
    await store.charge([charge(lease, 3_000), charge(lease, 4_000)])
    await clean(ledger)
    tamper = update(models.Reservation).where(models.Reservation.id == lease.lease_id)
    async with database.transaction() as session:
        await session.execute(tamper.values(charged_micros=6_000))
    try:
        found = {(d.kind, d.subject) for d in await ledger.reconcile(consistent=True)}
        assert ("charge", lease.lease_id) in found
    finally:
        async with database.transaction() as session:
            await session.execute(tamper.values(charged_micros=7_000))
    await clean(ledger)
