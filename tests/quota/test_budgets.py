"""Budgets per key and per user over calendar windows (quota's ``budgets``, the one source of caps):
holds, charges, resets, and caps changed mid-window."""

from __future__ import annotations

import datetime

import pytest
from sqlalchemy import select, text

from services.common.clock import ManualClock
from services.common.db import Database
from services.common.errors import BudgetExceeded, InvalidRequest
from services.quota import models
from services.quota.budgets import Budgets, Calendar
from services.quota.ledger import Ledger
from services.quota.pricing import Price, PriceBook, Usage
from tests.quota.factories import funded_user, priced_model, reservation_id
from tests.quota.fixtures import TTL_S

# 1 unit/Mtok in, 2 units/Mtok out, 100 per request: 1000 in + 1000 out reserves 1000 + 2000 + 100.
RATES = {"input_per_mtok": 1_000_000, "output_per_mtok": 2_000_000, "per_request": 100}
HOLD = 3_100


def at(iso: str) -> float:
    return datetime.datetime.fromisoformat(iso).replace(tzinfo=datetime.UTC).timestamp()


@pytest.fixture
def budgets(database: Database, clock: ManualClock) -> Budgets:
    return Budgets(database, clock=clock, calendar=Calendar())


async def reserve(ledger: Ledger, model: Price, user: str, key: str = "") -> str:
    rid = reservation_id()
    await ledger.reserve(
        reservation_id=rid,
        user_id=user,
        key_id=key,
        model=model.model,
        prompt_tokens=1000,
        max_output_tokens=1000,
    )
    return rid


async def cap(budgets: Budgets, scope: str, scope_id: str, **periods: int) -> None:
    for period, micros in periods.items():
        await budgets.set_budget(scope=scope, scope_id=scope_id, period=period, limit_micros=micros)


async def window(db: Database, scope: str, scope_id: str, period: str, start: float) -> tuple[int, int]:
    async with db.reader(consistent=True) as session:
        row = (
            await session.execute(
                select(models.BudgetUsage.spent_micros, models.BudgetUsage.reserved_micros).where(
                    models.BudgetUsage.scope == scope,
                    models.BudgetUsage.scope_id == scope_id,
                    models.BudgetUsage.period == period,
                    models.BudgetUsage.window_start == int(start),
                )
            )
        ).one_or_none()
    return (int(row[0]), int(row[1])) if row else (0, 0)


async def test_a_daily_budget_resets_at_midnight_and_settles_in_its_own_window(
    ledger: Ledger, prices: PriceBook, clock: ManualClock, database: Database, budgets: Budgets
) -> None:
    model = await priced_model(prices, **RATES)
    user = await funded_user(ledger, 100 * HOLD)
    key = reservation_id()
    await cap(budgets, "key", key, day=2 * HOLD)
    clock.now = at("2026-03-10T23:59:59")
    first = await reserve(ledger, model, user, key)
    second = await reserve(ledger, model, user, key)

    with pytest.raises(BudgetExceeded) as refused:
        await reserve(ledger, model, user, key)
    assert f"the daily budget of key {key} is 6200 micro-units and 0 are left until 2026-03-11T00:00:00Z" in (
        refused.value.message
    )
    assert (refused.value.param, refused.value.retry_after) == ("budgets.key.day", 1.0)

    clock.advance(1)
    third = await reserve(ledger, model, user, key)
    await ledger.settle(first, Usage(prompt_tokens=1000, completion_tokens=100))  # 1,300
    await ledger.release(second)

    assert await window(database, "key", key, "day", at("2026-03-10T00:00:00")) == (1_300, 0)
    assert await window(database, "key", key, "day", at("2026-03-11T00:00:00")) == (0, HOLD)
    await ledger.settle(third, Usage(prompt_tokens=1000, completion_tokens=1000))
    assert await window(database, "key", key, "day", at("2026-03-11T00:00:00")) == (HOLD, 0)
    assert await ledger.reconcile(consistent=True) == []


async def test_budgets_beyond_32_bits(ledger: Ledger, prices: PriceBook, budgets: Budgets) -> None:
    model = await priced_model(prices, **RATES)
    user = await funded_user(ledger, 10**14)
    big = 10**13
    key = reservation_id()
    await cap(budgets, "user", user, month=big)
    await cap(budgets, "key", key, day=big + 1)
    rid = await reserve(ledger, model, user, key)
    await ledger.settle(rid, Usage(prompt_tokens=1000))

    statuses = await budgets.statuses(scope="user", scope_id=user, consistent=True)
    assert [(s.period, s.effective_limit_micros) for s in statuses if s.limit_micros] == [("month", big)]
    statuses = await budgets.statuses(scope="key", scope_id=key, consistent=True)
    assert [(s.period, s.effective_limit_micros) for s in statuses if s.limit_micros] == [("day", big + 1)]
    assert await ledger.reconcile(consistent=True) == []


async def test_a_monthly_user_budget_is_shared_by_the_users_keys(
    ledger: Ledger, prices: PriceBook, clock: ManualClock, budgets: Budgets
) -> None:
    model = await priced_model(prices, **RATES)
    user = await funded_user(ledger, 100 * HOLD)
    await cap(budgets, "user", user, month=3 * HOLD)
    clock.now = at("2026-02-28T12:00:00")
    for key in ("k_one", "k_two", "k_one"):
        await reserve(ledger, model, user, key)

    with pytest.raises(
        BudgetExceeded, match=f"the monthly budget of user {user}.*until 2026-03-01T00:00:00Z"
    ) as refused:
        await reserve(ledger, model, user, "k_three")
    assert refused.value.param == "budgets.user.month"

    clock.now = at("2026-03-01T00:00:00")
    await reserve(ledger, model, user, "k_three")


async def test_a_budget_changed_mid_window_applies_to_the_next_hold(
    ledger: Ledger, prices: PriceBook, budgets: Budgets, clock: ManualClock
) -> None:
    model = await priced_model(prices, **RATES)
    user = await funded_user(ledger, 100 * HOLD)
    clock.now = at("2026-05-05T10:00:00")
    stored = await budgets.set_budget(
        scope="user", scope_id=user, period="day", limit_micros=HOLD, actor="ops"
    )
    assert (stored.limit_micros, stored.spent_micros, stored.effective_limit_micros) == (HOLD, 0, 0)

    await reserve(ledger, model, user)
    with pytest.raises(BudgetExceeded):
        await reserve(ledger, model, user)
    await cap(budgets, "user", user, day=4 * HOLD)  # raised: three more fit, counted with the first
    for _ in range(3):
        await reserve(ledger, model, user)
    with pytest.raises(BudgetExceeded):
        await reserve(ledger, model, user)
    await cap(budgets, "user", user, day=2 * HOLD)  # lowered below what is held: nothing more fits
    with pytest.raises(BudgetExceeded):
        await reserve(ledger, model, user)

    await cap(budgets, "user", user, day=0)
    await reserve(ledger, model, user)  # no budget at all any more
    [day, month] = await budgets.statuses(scope="user", scope_id=user, consistent=True)
    # The last hold was taken with no budget in force: it is not counted in the window.
    assert (day.period, day.limit_micros, day.reserved_micros) == ("day", 0, 4 * HOLD)
    assert (day.window_start, day.resets_at) == (
        int(at("2026-05-05T00:00:00")),
        int(at("2026-05-06T00:00:00")),
    )
    assert day.effective_limit_micros == 4 * HOLD, "the cap in force at the window's latest hold"
    assert (month.period, month.window_start, month.reserved_micros) == (
        "month",
        int(at("2026-05-01T00:00:00")),
        0,
    )


async def test_expiry_and_release_both_give_the_budget_back(
    ledger: Ledger, prices: PriceBook, clock: ManualClock, database: Database, budgets: Budgets
) -> None:
    model = await priced_model(prices, **RATES)
    user = await funded_user(ledger, 100 * HOLD)
    clock.now = at("2026-06-01T08:00:00")
    await cap(budgets, "user", user, day=2 * HOLD, month=10 * HOLD)
    released = await reserve(ledger, model, user)
    expiring = await reserve(ledger, model, user)
    await ledger.release(released)

    clock.advance(TTL_S)
    assert await ledger.expire_due() >= 1

    for period, start in (("day", "2026-06-01T00:00:00"), ("month", "2026-06-01T00:00:00")):
        assert await window(database, "user", user, period, at(start)) == (0, 0)
    outcome = await ledger.settle(expiring, Usage())
    assert (outcome.state, outcome.repeated, outcome.charged_micros) == ("expired", True, 0)
    await reserve(ledger, model, user)  # the whole day's room is back
    await reserve(ledger, model, user)
    with pytest.raises(BudgetExceeded, match="daily budget"):
        await reserve(ledger, model, user)


async def test_overage_is_bounded_by_the_budget_too(
    database: Database, prices: PriceBook, clock: ManualClock, budgets: Budgets
) -> None:
    ledger = Ledger(database, prices, clock=clock, reservation_ttl_s=TTL_S, allow_overage=True)
    model = await priced_model(prices, **RATES)
    user = await funded_user(ledger, 100_000)
    clock.now = at("2026-07-01T00:00:00")
    await cap(budgets, "key", "k_over", day=5_000)
    rid = await reserve(ledger, model, user, "k_over")

    outcome = await ledger.settle(rid, Usage(prompt_tokens=1000, completion_tokens=20_000))

    # The balance would cover 41,100; the key's daily budget leaves room for 5,000.
    assert (outcome.charged_micros, outcome.flags) == (5_000, ("overage", "capped"))
    assert await window(database, "key", "k_over", "day", at("2026-07-01T00:00:00")) == (5_000, 0)
    assert await ledger.reconcile(consistent=True) == []


async def test_free_requests_need_no_budget(
    ledger: Ledger, prices: PriceBook, clock: ManualClock, budgets: Budgets
) -> None:
    free = await prices.set_price(Price(f"free-{reservation_id()}"))
    paid = await priced_model(prices, **RATES)
    user = await funded_user(ledger, 10 * HOLD)
    key = reservation_id()
    await cap(budgets, "key", key, day=HOLD)
    clock.now = at("2026-08-01T00:00:00")
    await reserve(ledger, paid, user, key)

    hold = await ledger.reserve(
        reservation_id=reservation_id(), user_id=user, key_id=key, model=free.model, prompt_tokens=5
    )

    assert hold.reserved_micros == 0


async def test_reconcile_finds_a_tampered_budget_window(
    ledger: Ledger, prices: PriceBook, clock: ManualClock, database: Database, budgets: Budgets
) -> None:
    model = await priced_model(prices, **RATES)
    user = await funded_user(ledger, 10 * HOLD)
    key = reservation_id()
    await cap(budgets, "key", key, day=5 * HOLD)
    clock.now = at("2026-09-09T09:00:00")
    rid = await reserve(ledger, model, user, key)
    await ledger.settle(rid, Usage(prompt_tokens=10))
    assert await ledger.reconcile(consistent=True) == []

    tamper = "UPDATE budget_usage SET spent_micros = spent_micros + :d WHERE scope_id = :k"
    async with database.transaction() as session:
        await session.execute(text(tamper), {"d": 42, "k": key})
    try:
        found = await ledger.reconcile(consistent=True)
    finally:
        async with database.transaction() as session:
            await session.execute(text(tamper), {"d": -42, "k": key})

    [discrepancy] = found
    start = int(at("2026-09-09T00:00:00"))
    assert (discrepancy.kind, discrepancy.subject) == ("budget", f"key:{key}:day:{start}")
    assert discrepancy.stored_micros - discrepancy.expected_micros == 42
    assert "spent" in discrepancy.describe()


@pytest.mark.parametrize(
    ("scope", "scope_id", "period", "limit"),
    [
        pytest.param("team", "t1", "day", 10, id="unknown scope"),
        pytest.param("key", "", "day", 10, id="no id"),
        pytest.param("key", "k1", "week", 10, id="unknown period"),
        pytest.param("key", "k1", "day", -1, id="negative"),
    ],
)
async def test_invalid_budgets_are_refused(
    budgets: Budgets, scope: str, scope_id: str, period: str, limit: int
) -> None:
    with pytest.raises(InvalidRequest):
        await budgets.set_budget(scope=scope, scope_id=scope_id, period=period, limit_micros=limit)


# -- calendar windows ------------------------------------------------------------------------------------


def test_utc_windows_and_their_ends() -> None:
    calendar = Calendar()
    day, month = calendar.windows(at("2024-02-29T13:14:15"))
    assert (day, month) == (int(at("2024-02-29T00:00:00")), int(at("2024-02-01T00:00:00")))
    assert calendar.end_of("day", day) == int(at("2024-03-01T00:00:00"))
    assert calendar.end_of("month", month) == int(at("2024-03-01T00:00:00"))
    assert calendar.end_of("month", int(at("2024-12-01T00:00:00"))) == int(at("2025-01-01T00:00:00"))
    # The cached windows follow the clock across a boundary.
    assert calendar.windows(at("2024-03-01T00:00:00")) == (int(at("2024-03-01T00:00:00")),) * 2


def test_windows_follow_a_time_zone_through_daylight_saving() -> None:
    paris = Calendar("Europe/Paris")
    # 2026-03-29: clocks go from 02:00 to 03:00 in Paris, so that day lasts 23 hours.
    day, month = paris.windows(at("2026-03-29T12:00:00"))
    assert day == int(at("2026-03-28T23:00:00"))  # midnight in Paris, UTC+1
    assert paris.end_of("day", day) - day == 23 * 3600
    assert month == int(at("2026-02-28T23:00:00"))
    with pytest.raises(ValueError, match="unknown time zone"):
        Calendar("Mars/Olympus_Mons")
