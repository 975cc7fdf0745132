"""The embedded default: the same ledger and catalog on a SQLite file shared by two engines."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.catalog.channel import Channel
from services.catalog.store import Catalog
from services.common.clock import ManualClock
from services.common.config import DatabaseSettings
from services.common.db import Database
from services.common.errors import BudgetExceeded, InsufficientQuota
from services.migrations import upgrade
from services.quota.budgets import Budgets, Calendar
from services.quota.ledger import Ledger
from services.quota.limits import Limits
from services.quota.pricing import Price, PriceBook, Usage
from tests.quota.factories import reservation_id


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


async def test_ledger_and_catalog_on_sqlite(sqlite_dbs: tuple[Database, Database]) -> None:
    clock = ManualClock()
    ledgers = [
        Ledger(db, PriceBook(db, clock=clock, cache_ttl_s=2.0), clock=clock, reservation_ttl_s=60)
        for db in sqlite_dbs
    ]
    prices = PriceBook(sqlite_dbs[0], clock=clock, cache_ttl_s=2.0)
    await prices.set_price(Price("local", input_per_mtok=1_000_000, output_per_mtok=2_000_000))
    await ledgers[0].top_up(user_id="u_local", amount_micros=30 * 500, idempotency_key="seed")
    await ledgers[1].top_up(user_id="u_local", amount_micros=30 * 500, idempotency_key="seed")

    ids = [reservation_id() for _ in range(40)]
    results = await asyncio.gather(
        *(
            ledgers[i % 2].reserve(
                reservation_id=rid, user_id="u_local", model="local", prompt_tokens=100, max_output_tokens=200
            )
            for i, rid in enumerate(ids)
        ),
        return_exceptions=True,
    )
    held = [rid for rid, r in zip(ids, results, strict=True) if not isinstance(r, BaseException)]
    assert len(held) == 30
    assert all(isinstance(r, InsufficientQuota) for r in results if isinstance(r, BaseException))

    outcomes = await asyncio.gather(
        ledgers[0].settle(held[0], Usage(prompt_tokens=100, completion_tokens=10)),
        ledgers[1].release(held[0]),
        ledgers[1].release(held[1]),
    )
    assert sum(not o.repeated for o in outcomes[:2]) == 1
    clock.advance(60)
    assert await ledgers[0].expire_due() == 28
    balance = await ledgers[1].balance("u_local")
    assert balance.reserved_micros == 0
    assert await ledgers[0].reconcile() == []

    catalog = Catalog(sqlite_dbs[0], clock=clock)
    channel = await catalog.upsert_channel(
        Channel(name="local", base_url="http://127.0.0.1:9/v1", models=("local",))
    )
    listing = await Catalog(sqlite_dbs[1], clock=clock).list_channels(0)
    assert listing.channels == (channel,)
    assert (await catalog.list_channels(listing.revision)).unchanged


async def test_budgets_limits_and_reports_on_sqlite(sqlite_dbs: tuple[Database, Database]) -> None:
    clock = ManualClock()
    ledgers = [
        Ledger(db, PriceBook(db, clock=clock, cache_ttl_s=2.0), clock=clock, reservation_ttl_s=60)
        for db in sqlite_dbs
    ]
    await PriceBook(sqlite_dbs[0], clock=clock, cache_ttl_s=2.0).set_price(Price("local", per_request=500))
    await ledgers[0].top_up(user_id="u_budget", amount_micros=100 * 500)
    budgets = Budgets(sqlite_dbs[1], clock=clock, calendar=Calendar())
    await budgets.set_budget(scope="user", scope_id="u_budget", period="month", limit_micros=10 * 500)

    results = await asyncio.gather(
        *(
            ledgers[i % 2].reserve(
                reservation_id=reservation_id(),
                user_id="u_budget",
                key_id="k_local",
                model="local",
                prompt_tokens=1,
                key_limits=Limits(rpm=12),
            )
            for i in range(15)
        ),
        return_exceptions=True,
    )
    held = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(held) == 10
    # Each process has its own in-process limiter (no Redis): 12 per minute each, so only the
    # budget, kept in the shared database, refuses here.
    assert all(isinstance(r, BudgetExceeded) for r in refused)
    await ledgers[1].settle(held[0].reservation_id, Usage())
    page = await ledgers[0].list_reservations("u_budget", state="settled")
    assert [v.reservation_id for v in page.reservations] == [held[0].reservation_id]
    [_, month] = await budgets.statuses(scope="user", scope_id="u_budget")
    assert (month.spent_micros, month.reserved_micros, month.limit_micros) == (500, 9 * 500, 10 * 500)
    assert await ledgers[0].reconcile() == []
