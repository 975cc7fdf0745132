"""Leases on the embedded default: SQLite shared by two quota processes' engines."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.common.clock import ManualClock
from services.common.config import DatabaseSettings
from services.common.credit import Charge, CreditTerms, LeaseAsk, LeaseReport, SyncRequest
from services.common.db import Database
from services.common.errors import CreditRecalled
from services.migrations import upgrade
from services.quota.budgets import Budgets, Calendar
from services.quota.leasing import CreditStore
from services.quota.ledger import Ledger
from services.quota.pricing import Price, PriceBook

TERMS = CreditTerms(sync_interval_ms=1_000, valid_for_ms=30_000, grace_ms=5_000, horizon_ms=60_000)


@pytest.fixture
async def sqlite_dbs(tmp_path: Path) -> AsyncIterator[tuple[Database, Database]]:
    url = f"sqlite:///{tmp_path / 'relaygate.db'}"
    await upgrade(url)
    dbs = (Database(DatabaseSettings(database_url=url)), Database(DatabaseSettings(database_url=url)))
    for db in dbs:
        await db.start()
    try:
        yield dbs
    finally:
        for db in dbs:
            await db.close()


async def test_leases_sync_charge_expire_and_recall_on_sqlite(sqlite_dbs: tuple[Database, Database]) -> None:
    clock = ManualClock()
    stores = [CreditStore(db, Calendar(), TERMS, clock) for db in sqlite_dbs]
    prices = PriceBook(sqlite_dbs[0], clock=clock, cache_ttl_s=2.0)
    ledger = Ledger(sqlite_dbs[0], prices, clock=clock, reservation_ttl_s=60, credit=stores[0])
    await prices.set_price(Price("local", input_per_mtok=0, output_per_mtok=0, per_request=150_000))
    await ledger.top_up(user_id="u_local", amount_micros=200_000, idempotency_key="seed")

    lease = LeaseAsk("lse_local", "k_local", "u_local", want_micros=100_000, min_micros=1_000)
    await Budgets(sqlite_dbs[0], clock=clock, calendar=Calendar()).set_budget(
        scope="key", scope_id=lease.key_id, period="month", limit_micros=500_000
    )
    [grant] = (await stores[0].sync(SyncRequest("relay-a", 1, asks=(lease,)))).grants
    assert (grant.state, grant.granted_micros) == ("open", 100_000)

    charges = [Charge(f"req_{i}", lease.lease_id, lease.key_id, lease.user_id, 1_000) for i in range(20)]
    first, second = await asyncio.gather(stores[0].charge(charges), stores[1].charge(charges))
    assert len(first) + len(second) == 20
    balance = await ledger.balance("u_local", consistent=True)
    assert (balance.balance_micros, balance.reserved_micros) == (180_000, 80_000)
    assert await ledger.reconcile() == []

    # 150,000 is more than is free (100,000) but not more than free plus the lease's unused 80,000.
    with pytest.raises(CreditRecalled):
        await ledger.reserve(reservation_id="rsv_local", user_id="u_local", model="local", prompt_tokens=0)
    [recalled] = (
        await stores[1].sync(SyncRequest("relay-a", 2, reports=(LeaseReport(lease.lease_id, 20_000, 0),)))
    ).grants
    assert recalled.recall

    clock.advance((TERMS.valid_for_ms + TERMS.grace_ms) / 1000 + 1)
    assert await stores[1].expire_due() == 1
    assert (await ledger.balance("u_local", consistent=True)).reserved_micros == 0
    hold = await ledger.reserve(reservation_id="rsv_local", user_id="u_local", model="local", prompt_tokens=0)
    assert hold.reserved_micros == 150_000
    assert await ledger.reconcile() == []
    await ledger.close()
