"""Reserve -> settle / release / expire, top-ups and balance reads, one operation at a time."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import pytest

from devinfra.backing import BackingServices
from services.common.clock import ManualClock
from services.common.db import Database
from services.common.errors import Conflict, InsufficientQuota, InvalidRequest, ModelNotFound, NotFound
from services.quota.ledger import EXPIRED, RELEASED, SETTLED, Hold, Ledger
from services.quota.pricing import Price, PriceBook, Usage
from tests.quota.factories import (
    charges_for,
    funded_user,
    ledger_entries,
    priced_model,
    reservation_id,
    reservation_row,
)
from tests.quota.fixtures import TTL_S

# 1 unit/Mtok in, 2 units/Mtok out, 100 per request: 1000 in + 1000 out reserves 1000 + 2000 + 100.
RATES = {"input_per_mtok": 1_000_000, "output_per_mtok": 2_000_000, "per_request": 100}
HOLD = 3_100


async def test_settle_charges_price_times_usage_and_returns_the_rest(
    ledger: Ledger, prices: PriceBook, database: Database
) -> None:
    model = await priced_model(prices, **RATES)
    user = await funded_user(ledger, 10_000)
    rid = reservation_id()

    hold = await ledger.reserve(
        reservation_id=rid, user_id=user, model=model.model, prompt_tokens=1000, max_output_tokens=1000
    )
    assert (hold.reserved_micros, hold.available_micros, hold.repeated) == (HOLD, 10_000 - HOLD, False)
    assert hold.expires_at == int(ManualClock().time()) + TTL_S
    assert (await ledger.balance(user, consistent=True)).reserved_micros == HOLD

    outcome = await ledger.settle(rid, Usage(prompt_tokens=1000, completion_tokens=250))

    assert (outcome.state, outcome.charged_micros, outcome.reserved_micros) == (SETTLED, 1_600, HOLD)
    assert (outcome.price_id, outcome.repeated, outcome.flags) == (model.price_id, False, ())
    balance = await ledger.balance(user, consistent=True)
    assert (balance.balance_micros, balance.reserved_micros) == (8_400, 0)
    [topup, charge] = await ledger_entries(database, user)
    assert (topup.kind, topup.amount_micros) == ("topup", 10_000)
    assert (charge.kind, charge.amount_micros, charge.reservation_id) == ("charge", -1_600, rid)
    assert charge.price_id == model.price_id
    row = await reservation_row(database, rid)
    assert row.usage["completion_tokens"] == 250
    assert await ledger.reconcile(consistent=True) == []


async def test_zero_usage_is_charged_the_per_request_price(ledger: Ledger, prices: PriceBook) -> None:
    model = await priced_model(prices, **RATES)
    user = await funded_user(ledger, 10_000)
    rid = reservation_id()
    await ledger.reserve(reservation_id=rid, user_id=user, model=model.model, prompt_tokens=10)

    outcome = await ledger.settle(rid, Usage())

    assert outcome.charged_micros == 100


async def test_settle_uses_the_price_the_hold_was_made_at(ledger: Ledger, prices: PriceBook) -> None:
    model = await priced_model(prices, **RATES)
    user = await funded_user(ledger, 10_000)
    rid = reservation_id()
    await ledger.reserve(
        reservation_id=rid, user_id=user, model=model.model, prompt_tokens=1000, max_output_tokens=1000
    )
    await prices.set_price(Price(model.model, input_per_mtok=50_000_000))

    outcome = await ledger.settle(rid, Usage(prompt_tokens=1000))

    assert (outcome.price_id, outcome.charged_micros) == (model.price_id, 1_100)


async def test_repeated_settle_charges_once(ledger: Ledger, prices: PriceBook, database: Database) -> None:
    model = await priced_model(prices, **RATES)
    user = await funded_user(ledger, 10_000)
    rid = reservation_id()
    await ledger.reserve(reservation_id=rid, user_id=user, model=model.model, prompt_tokens=1000)
    first = await ledger.settle(rid, Usage(prompt_tokens=1000, completion_tokens=10))

    again = await ledger.settle(rid, Usage(prompt_tokens=5000, completion_tokens=5000))
    release = await ledger.release(rid, "client gone")

    for repeat in (again, release):
        assert repeat.repeated
        assert (repeat.state, repeat.charged_micros, repeat.price_id) == (
            SETTLED,
            first.charged_micros,
            first.price_id,
        )
    assert len(await charges_for(database, rid)) == 1
    assert (await ledger.balance(user, consistent=True)).balance_micros == 10_000 - first.charged_micros


async def test_release_returns_the_hold_and_writes_no_entry(
    ledger: Ledger, prices: PriceBook, database: Database
) -> None:
    model = await priced_model(prices, **RATES)
    user = await funded_user(ledger, 10_000)
    rid = reservation_id()
    await ledger.reserve(reservation_id=rid, user_id=user, model=model.model, prompt_tokens=1000)

    released = await ledger.release(rid, "upstream failed")
    again = await ledger.release(rid, "upstream failed")
    late_settle = await ledger.settle(rid, Usage(prompt_tokens=1000))

    assert (released.state, released.charged_micros, released.repeated) == (RELEASED, 0, False)
    assert (again.repeated, late_settle.repeated, late_settle.state, late_settle.charged_micros) == (
        True,
        True,
        RELEASED,
        0,
    )
    assert await charges_for(database, rid) == []
    balance = await ledger.balance(user, consistent=True)
    assert (balance.balance_micros, balance.reserved_micros) == (10_000, 0)


async def test_unknown_reservation_is_not_found(ledger: Ledger) -> None:
    with pytest.raises(NotFound):
        await ledger.settle("rsv_missing", Usage())
    with pytest.raises(NotFound):
        await ledger.release("rsv_missing")


async def test_insufficient_quota_says_needed_and_available(ledger: Ledger, prices: PriceBook) -> None:
    model = await priced_model(prices, **RATES)
    user = await funded_user(ledger, 3_000)

    with pytest.raises(InsufficientQuota, match="needs 3100 micro-units but only 3000 are available"):
        await ledger.reserve(
            reservation_id=reservation_id(),
            user_id=user,
            model=model.model,
            prompt_tokens=1000,
            max_output_tokens=1000,
        )
    with pytest.raises(InsufficientQuota, match="only 0 are available"):
        await ledger.reserve(
            reservation_id=reservation_id(), user_id="u_nobody", model=model.model, prompt_tokens=1
        )
    assert (await ledger.balance(user, consistent=True)).reserved_micros == 0


async def test_reserve_refuses_an_unpriced_model_and_bad_counts(ledger: Ledger) -> None:
    with pytest.raises(ModelNotFound):
        await ledger.reserve(reservation_id=reservation_id(), user_id="u1", model="unpriced", prompt_tokens=1)
    with pytest.raises(InvalidRequest):
        await ledger.reserve(reservation_id="", user_id="u1", model="unpriced", prompt_tokens=1)
    with pytest.raises(InvalidRequest):
        await ledger.reserve(reservation_id=reservation_id(), user_id="u1", model="m", prompt_tokens=-1)


async def test_reserve_is_idempotent_by_reservation_id(ledger: Ledger, prices: PriceBook) -> None:
    model = await priced_model(prices, **RATES)
    user = await funded_user(ledger, 10_000)
    rid = reservation_id()

    def reserve(user_id: str = user) -> Awaitable[Hold]:
        return ledger.reserve(reservation_id=rid, user_id=user_id, model=model.model, prompt_tokens=1000)

    first = await reserve()
    second = await reserve()

    assert (first.repeated, second.repeated) == (False, True)
    assert second.reserved_micros == first.reserved_micros
    assert (await ledger.balance(user, consistent=True)).reserved_micros == first.reserved_micros
    with pytest.raises(Conflict):
        await reserve("u_someone_else")
    await ledger.settle(rid, Usage())
    with pytest.raises(Conflict, match="already settled"):
        await reserve()


async def test_overage_is_capped_at_the_hold_by_default(ledger: Ledger, prices: PriceBook) -> None:
    model = await priced_model(prices, **RATES)
    user = await funded_user(ledger, 100_000)
    rid = reservation_id()
    await ledger.reserve(
        reservation_id=rid, user_id=user, model=model.model, prompt_tokens=1000, max_output_tokens=1000
    )

    outcome = await ledger.settle(rid, Usage(prompt_tokens=1000, completion_tokens=20_000))

    assert (outcome.charged_micros, outcome.flags) == (HOLD, ("capped",))


async def test_overage_when_allowed_is_charged_up_to_what_the_balance_covers(
    database: Database, prices: PriceBook, clock: ManualClock
) -> None:
    ledger = Ledger(database, prices, clock=clock, reservation_ttl_s=TTL_S, allow_overage=True)
    model = await priced_model(prices, **RATES)
    rich = await funded_user(ledger, 100_000)
    rid = reservation_id()
    await ledger.reserve(
        reservation_id=rid, user_id=rich, model=model.model, prompt_tokens=1000, max_output_tokens=1000
    )
    outcome = await ledger.settle(rid, Usage(prompt_tokens=1000, completion_tokens=20_000))
    assert (outcome.charged_micros, outcome.flags) == (41_100, ("overage",))

    # 5,000 in the balance, 1,100 of it held by another request: this one may take at most 3,900.
    poor = await funded_user(ledger, 5_000)
    await ledger.reserve(
        reservation_id=reservation_id(),
        user_id=poor,
        model=model.model,
        prompt_tokens=0,
        max_output_tokens=500,
    )
    last = reservation_id()
    await ledger.reserve(
        reservation_id=last, user_id=poor, model=model.model, prompt_tokens=1000, max_output_tokens=1000
    )

    bounded = await ledger.settle(last, Usage(prompt_tokens=1000, completion_tokens=20_000))

    assert (bounded.charged_micros, bounded.flags) == (3_900, ("overage", "capped"))
    after = await ledger.balance(poor, consistent=True)
    assert (after.balance_micros, after.reserved_micros, after.available_micros) == (1_100, 1_100, 0)
    assert await ledger.reconcile(consistent=True) == []


async def test_estimated_usage_never_exceeds_the_hold(
    database: Database, prices: PriceBook, clock: ManualClock
) -> None:
    ledger = Ledger(database, prices, clock=clock, reservation_ttl_s=TTL_S, allow_overage=True)
    model = await priced_model(prices, **RATES)
    user = await funded_user(ledger, 100_000)
    rid = reservation_id()
    await ledger.reserve(
        reservation_id=rid, user_id=user, model=model.model, prompt_tokens=1000, max_output_tokens=1000
    )

    outcome = await ledger.settle(rid, Usage(prompt_tokens=1000, completion_tokens=20_000, estimated=True))

    assert (outcome.charged_micros, outcome.flags) == (HOLD, ("capped", "estimated"))


async def test_expired_hold_is_released_and_a_late_settle_charges_nothing(
    ledger: Ledger, prices: PriceBook, clock: ManualClock, database: Database
) -> None:
    model = await priced_model(prices, **RATES)
    user = await funded_user(ledger, 10_000)
    rid = reservation_id()
    await ledger.reserve(
        reservation_id=rid, user_id=user, model=model.model, prompt_tokens=1000, max_output_tokens=1000
    )

    clock.advance(TTL_S - 1)
    await ledger.expire_due()
    assert (await reservation_row(database, rid)).state == "held"
    clock.advance(1)
    # Holds left by earlier tests of this module (same clock origin) expire now as well.
    assert await ledger.expire_due() >= 1
    assert await ledger.expire_due() == 0

    row = await reservation_row(database, rid)
    # Nothing shows the request reached an upstream: the hold is given back, flagged, and no ledger
    # entry is written (only a late usage event would write the request's one).
    assert (row.state, row.charged_micros) == (EXPIRED, 0)
    assert await charges_for(database, rid) == []
    late = await ledger.settle(rid, Usage(prompt_tokens=1))
    assert (late.repeated, late.state, late.charged_micros, late.flags) == (True, EXPIRED, 0, ("expired",))
    balance = await ledger.balance(user, consistent=True)
    assert (balance.balance_micros, balance.reserved_micros) == (10_000, 0)
    assert await ledger.reconcile(consistent=True) == []


async def test_top_up_is_idempotent_by_key(ledger: Ledger, database: Database) -> None:
    user = await funded_user(ledger, 1_000)

    first = await ledger.top_up(user_id=user, amount_micros=500, reason="invoice 7", idempotency_key="inv-7")
    again = await ledger.top_up(user_id=user, amount_micros=500, reason="invoice 7", idempotency_key="inv-7")
    raced = await asyncio.gather(
        *(ledger.top_up(user_id=user, amount_micros=300, idempotency_key="inv-8") for _ in range(8))
    )

    assert first.balance_micros == again.balance_micros == 1_500
    assert {view.balance_micros for view in raced} == {1_800}
    assert [e.amount_micros for e in await ledger_entries(database, user)] == [1_000, 500, 300]
    with pytest.raises(Conflict):
        await ledger.top_up(user_id="u_other", amount_micros=500, idempotency_key="inv-7")


async def test_adjustment_below_the_held_amount_is_refused(ledger: Ledger, prices: PriceBook) -> None:
    model = await priced_model(prices, **RATES)
    user = await funded_user(ledger, 10_000)
    await ledger.reserve(
        reservation_id=reservation_id(),
        user_id=user,
        model=model.model,
        prompt_tokens=1000,
        max_output_tokens=1000,
    )

    with pytest.raises(InvalidRequest, match="below the 3100 held"):
        await ledger.top_up(user_id=user, amount_micros=-(10_000 - HOLD + 1))
    adjusted = await ledger.top_up(user_id=user, amount_micros=-(10_000 - HOLD), reason="refund")

    assert (adjusted.balance_micros, adjusted.available_micros) == (HOLD, 0)
    with pytest.raises(InvalidRequest):
        await ledger.top_up(user_id="u_new_" + reservation_id()[-8:], amount_micros=-1)
    with pytest.raises(InvalidRequest):
        await ledger.top_up(user_id=user, amount_micros=0)
    assert await ledger.reconcile(consistent=True) == []


async def test_balance_after_top_up_reads_its_own_write_with_replica_paused(
    ledger: Ledger, database: Database, backing: BackingServices
) -> None:
    user = await funded_user(ledger, 1_000)
    await database.wait_replica_caught_up(await database.primary_lsn() or 0)
    assert (await ledger.balance(user)).balance_micros == 1_000

    backing.pause_replica_replay()
    try:
        await ledger.top_up(user_id=user, amount_micros=234)

        assert (await ledger.balance(user, consistent=True)).balance_micros == 1_234
        # The default read goes to the frozen replica: proof that `consistent` is what made the difference.
        assert (await ledger.balance(user)).balance_micros == 1_000
    finally:
        backing.resume_replica_replay()
    assert await database.wait_replica_caught_up(await database.primary_lsn() or 0, timeout=5)
    assert (await ledger.balance(user)).balance_micros == 1_234
