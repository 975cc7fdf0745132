"""User-scope leases on the primary: one lease shared by a user's keys without budgets of their own,
quota's check that the asking key has none, and the list of budgeted keys relays are sent (real
PostgreSQL primary + replica)."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from services.common.clock import ManualClock
from services.common.credit import KEY_SCOPE, RESCOPE, USER_SCOPE, Charge, CreditTerms, LeaseAsk, SyncRequest
from services.common.db import Database
from services.common.errors import InvalidRequest
from services.common.ids import new_id
from services.quota import models
from services.quota.budgets import Budgets, Calendar
from services.quota.leasing import MAX_BUDGETED_KEYS, CreditStore, budgeted_keys
from services.quota.ledger import Ledger
from tests.quota.factories import funded_user

TERMS = CreditTerms(sync_interval_ms=1_000)


@pytest.fixture
def store(database: Database, clock: ManualClock) -> CreditStore:
    return CreditStore(database, Calendar(), TERMS, clock)


@pytest.fixture
def budgets(database: Database, clock: ManualClock) -> Budgets:
    return Budgets(database, clock=clock, calendar=Calendar())


async def clean(ledger: Ledger) -> None:
    assert [d.describe() for d in await ledger.reconcile(consistent=True)] == []


async def windows_of(database: Database, *scope_ids: str) -> dict[tuple[str, str], tuple[int, int]]:
    async with database.reader(consistent=True) as session:
        return {
            (w.scope, w.period): (w.spent_micros, w.reserved_micros)
            for w in await session.scalars(
                select(models.BudgetUsage).where(models.BudgetUsage.scope_id.in_(scope_ids))
            )
        }


async def test_a_user_lease_holds_the_users_windows_and_is_charged_by_any_of_its_keys(
    store: CreditStore, ledger: Ledger, database: Database, budgets: Budgets
) -> None:
    user = await funded_user(ledger, 1_000_000)
    await budgets.set_budget(scope="user", scope_id=user, period="day", limit_micros=400_000)
    lease = LeaseAsk(new_id("lse"), new_id("k"), user, 100_000, 1_000, USER_SCOPE)
    [grant] = (await store.sync(SyncRequest("relay-a", 1, asks=(lease,)))).grants
    assert (grant.state, grant.granted_micros) == ("open", 100_000)
    async with database.reader(consistent=True) as session:
        row = await session.get(models.Reservation, lease.lease_id)
    assert row is not None
    # Stored with no key: it holds on the user's balance and the user's windows only.
    assert (row.kind, row.key_id, row.user_id, row.reserved_micros) == ("lease", "", user, 100_000)
    assert await windows_of(database, user, lease.key_id) == {("user", "day"): (0, 100_000)}
    await clean(ledger)

    keys = [new_id("k") for _ in range(3)]
    posted = await store.charge(
        [
            Charge(new_id("req"), lease.lease_id, key_id, user, 1_000 * (n + 1))
            for n, key_id in enumerate(keys)
        ]
    )
    assert [p.charged for p in posted] == [1_000, 2_000, 3_000]
    assert not any(p.late or p.written_off for p in posted)
    assert await windows_of(database, user) == {("user", "day"): (6_000, 94_000)}
    balance = await ledger.balance(user, consistent=True)
    assert (balance.balance_micros, balance.reserved_micros) == (994_000, 94_000)
    await clean(ledger)


async def test_a_key_with_a_budget_of_its_own_cannot_take_its_users_shared_lease(
    store: CreditStore, ledger: Ledger, database: Database, budgets: Budgets
) -> None:
    user, key = await funded_user(ledger, 1_000_000), new_id("k")
    await budgets.set_budget(scope="key", scope_id=key, period="day", limit_micros=20_000)
    shared = LeaseAsk(new_id("lse"), key, user, 100_000, 1_000, USER_SCOPE)
    [grant] = (await store.sync(SyncRequest("relay-a", 1, asks=(shared,)))).grants
    # Quota reads the key's budget in the ask's own transaction, whatever the relay's list said.
    assert grant.state == RESCOPE
    async with database.reader(consistent=True) as session:
        assert await session.get(models.Reservation, shared.lease_id) is None
    assert (await ledger.balance(user, consistent=True)).reserved_micros == 0
    # Asked as its own scope, the lease holds against the key's budget.
    own = LeaseAsk(new_id("lse"), key, user, 100_000, 1_000, KEY_SCOPE)
    [grant] = (await store.sync(SyncRequest("relay-a", 2, asks=(own,)))).grants
    assert (grant.state, grant.granted_micros) == ("open", 10_000)
    assert await windows_of(database, key) == {("key", "day"): (0, 10_000)}
    await clean(ledger)


async def test_relays_are_sent_the_budgeted_keys_when_their_copy_is_out_of_date(
    store: CreditStore, clock: ManualClock, budgets: Budgets
) -> None:
    key = new_id("k")
    await budgets.set_budget(scope="key", scope_id=key, period="month", limit_micros=5_000)
    first = (await store.sync(SyncRequest("relay-a", 1))).budgeted
    assert first is not None and first.complete and key in first.key_ids
    # The same version: nothing is sent.
    assert (await store.sync(SyncRequest("relay-a", 2, budgeted_version=first.version))).budgeted is None
    # A budget set on another key (and a user budget, which is no key's) reaches the next list read,
    # at most half a sync interval later.
    other = new_id("k")
    await budgets.set_budget(scope="key", scope_id=other, period="day", limit_micros=5_000)
    await budgets.set_budget(scope="user", scope_id=new_id("u"), period="day", limit_micros=5_000)
    clock.advance(TERMS.sync_interval_ms / 2000)
    second = (await store.sync(SyncRequest("relay-a", 3, budgeted_version=first.version))).budgeted
    assert second is not None and second.version != first.version
    assert second.key_ids == first.key_ids | {other}
    # A removed budget leaves the list.
    await budgets.set_budget(scope="key", scope_id=other, period="day", limit_micros=0)
    clock.advance(TERMS.sync_interval_ms / 2000)
    third = (await store.sync(SyncRequest("relay-a", 4, budgeted_version=second.version))).budgeted
    assert third is not None and third.key_ids == first.key_ids


def test_a_list_longer_than_quota_sends_is_marked_incomplete() -> None:
    ids = sorted(f"k{index:06d}" for index in range(MAX_BUDGETED_KEYS + 1))
    listed = budgeted_keys(ids)
    assert not listed.complete and len(listed.key_ids) == MAX_BUDGETED_KEYS
    assert budgeted_keys(ids[:-1]).complete
    assert budgeted_keys(ids[:-1]).version == budgeted_keys(list(ids[:-1])).version != listed.version


@pytest.mark.parametrize(
    "request_",
    [
        SyncRequest("relay", 1, asks=(LeaseAsk("l", "k", "u", 5, 1, "team"),)),
        SyncRequest("relay", 1, asks=(LeaseAsk("l", "", "u", 5, 1, USER_SCOPE),)),
        SyncRequest("relay", 1, budgeted_version="v" * 65),
    ],
)
async def test_malformed_scoped_syncs_are_refused(store: CreditStore, request_: SyncRequest) -> None:
    with pytest.raises(InvalidRequest):
        await store.sync(request_)
