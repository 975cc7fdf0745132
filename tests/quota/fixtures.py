"""Quota fixtures: a price book and a ledger on the module's migrated database."""

from __future__ import annotations

import pytest

from services.common.clock import ManualClock
from services.common.db import Database
from services.quota.ledger import Ledger
from services.quota.pricing import PriceBook

TTL_S = 900


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def prices(database: Database, clock: ManualClock) -> PriceBook:
    return PriceBook(database, clock=clock, cache_ttl_s=2.0)


@pytest.fixture
def ledger(database: Database, prices: PriceBook, clock: ManualClock) -> Ledger:
    return Ledger(database, prices, clock=clock, reservation_ttl_s=TTL_S)
