"""Leases on the primary: syncs, charges from the usage stream, expiry and recall, with the books
reconciled after each (real PostgreSQL primary + replica)."""

from __future__ import annotations

import pytest

from services.common.clock import ManualClock
from services.common.credit import CreditTerms, LeaseAsk, LeaseReport, SyncRequest
from services.common.db import Database
from services.common.ids import new_id
from services.quota import models
from services.quota.budgets import Calendar
from services.quota.leasing import CreditStore
from services.quota.ledger import Ledger
from tests.quota.factories import funded_user

TERMS = CreditTerms(sync_interval_ms=1_000, valid_for_ms=30_000, grace_ms=5_000, horizon_ms=60_000)


@pytest.fixture
def store(database: Database, clock: ManualClock) -> CreditStore:
    return CreditStore(database, Calendar(), TERMS, clock)


def ask(user: str, *, key: str = "", want: int = 100_000, least: int = 1_000) -> LeaseAsk:
    return LeaseAsk(new_id("lse"), key or new_id("k"), user, want, least)


async def lease_row(db: Database, lease_id: str) -> models.Reservation:
    async with db.reader(consistent=True) as session:
        row = await session.get(models.Reservation, lease_id)
    assert row is not None
    return row


async def clean(ledger: Ledger) -> None:
    assert [d.describe() for d in await ledger.reconcile(consistent=True)] == []


async def test_a_lease_is_granted_as_a_hold_and_grows_with_syncs(
    store: CreditStore, ledger: Ledger, database: Database
) -> None:
    user = await funded_user(ledger, 1_000_000)
    first = ask(user)
    answer = await store.sync(SyncRequest("relay-a", 1, asks=(first,)))
    [grant] = answer.grants
    assert (grant.lease_id, grant.state, grant.granted_micros) == (first.lease_id, "open", 100_000)
    assert grant.valid_for_ms == TERMS.valid_for_ms
    assert (await ledger.balance(user, consistent=True)).reserved_micros == 100_000
    row = await lease_row(database, first.lease_id)
    assert (row.kind, row.state, row.reserved_micros, row.model, row.price_id) == (
        "lease",
        "held",
        100_000,
        "",
        0,
    )
    await clean(ledger)

    report = LeaseReport(first.lease_id, used_micros=0, inflight_micros=10_000, want_micros=50_000)
    [grown] = (await store.sync(SyncRequest("relay-a", 2, reports=(report,)))).grants
    assert (grown.state, grown.granted_micros) == ("open", 150_000)
    assert (await ledger.balance(user, consistent=True)).reserved_micros == 150_000
    await clean(ledger)
