"""Small builders for quota tests: uniquely named models and users, and direct reads of the tables."""

from __future__ import annotations

import uuid

from sqlalchemy import select

from services.common.db import Database
from services.common.ids import new_id
from services.quota import models
from services.quota.ledger import Ledger
from services.quota.pricing import Price, PriceBook


def reservation_id() -> str:
    return new_id("rsv")


async def priced_model(prices: PriceBook, **rates: int) -> Price:
    """A new model with a stored price (defaults: 1 unit/Mtok in, 2 units/Mtok out)."""
    values = {"input_per_mtok": 1_000_000, "output_per_mtok": 2_000_000, **rates}
    return await prices.set_price(Price(model=f"model-{uuid.uuid4().hex[:12]}", **values))


async def funded_user(ledger: Ledger, amount_micros: int) -> str:
    user_id = new_id("u")
    await ledger.top_up(user_id=user_id, amount_micros=amount_micros, reason="test funds", actor="tests")
    return user_id


async def ledger_entries(db: Database, user_id: str) -> list[models.LedgerEntry]:
    async with db.reader(consistent=True) as session:
        rows = await session.scalars(
            select(models.LedgerEntry)
            .where(models.LedgerEntry.user_id == user_id)
            .order_by(models.LedgerEntry.id)
        )
        return list(rows.all())


async def charges_for(db: Database, reservation_id: str) -> list[models.LedgerEntry]:
    async with db.reader(consistent=True) as session:
        rows = await session.scalars(
            select(models.LedgerEntry).where(models.LedgerEntry.reservation_id == reservation_id)
        )
        return list(rows.all())


async def reservation_row(db: Database, reservation_id: str) -> models.Reservation:
    async with db.reader(consistent=True) as session:
        row = await session.get(models.Reservation, reservation_id)
    assert row is not None
    return row
