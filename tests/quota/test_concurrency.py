"""The accounting invariants under concurrent traffic from two quota processes' worth of connections."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import func, select

from services.common.clock import ManualClock
from services.common.db import Database
from services.common.errors import InsufficientQuota, InvalidRequest
from services.quota import models
from services.quota.ledger import Ledger, Outcome
from services.quota.pricing import PriceBook, Usage
from tests.db_fixtures import DbUrls
from tests.quota.factories import charges_for, funded_user, priced_model, reservation_id
from tests.quota.fixtures import TTL_S

# 100 prompt tokens at 1 unit/Mtok + 200 output tokens at 2 units/Mtok: every hold is 500 micro-units.
HOLD = 500
PROMPT, MAX_OUTPUT = 100, 200


@pytest.fixture
async def second_db(migrated_db: DbUrls) -> AsyncIterator[Database]:
    """Another Database on the same primary + replica: a second quota process's connection pools."""
    db = Database(migrated_db.settings())
    await db.start()
    try:
        yield db
    finally:
        await db.close()


@pytest.fixture
def ledgers(ledger: Ledger, second_db: Database, clock: ManualClock) -> tuple[Ledger, Ledger]:
    other = Ledger(
        second_db, PriceBook(second_db, clock=clock, cache_ttl_s=2.0), clock=clock, reservation_ttl_s=TTL_S
    )
    return ledger, other


async def _account(db: Database, user_id: str) -> tuple[int, int]:
    async with db.reader(consistent=True) as session:
        row = (
            await session.execute(
                select(models.Account.balance_micros, models.Account.reserved_micros).where(
                    models.Account.user_id == user_id
                )
            )
        ).one()
    return int(row[0]), int(row[1])


async def test_200_parallel_reserves_against_150_holds_worth(
    ledgers: tuple[Ledger, Ledger], prices: PriceBook, database: Database
) -> None:
    model = await priced_model(prices)
    user = await funded_user(ledgers[0], 150 * HOLD)
    ids = [reservation_id() for _ in range(200)]
    seen: list[tuple[int, int]] = []
    done = asyncio.Event()

    async def watch() -> None:
        while not done.is_set():
            seen.append(await _account(database, user))

    watcher = asyncio.create_task(watch())
    results = await asyncio.gather(
        *(
            ledgers[i % 2].reserve(
                reservation_id=rid,
                user_id=user,
                model=model.model,
                prompt_tokens=PROMPT,
                max_output_tokens=MAX_OUTPUT,
            )
            for i, rid in enumerate(ids)
        ),
        return_exceptions=True,
    )
    done.set()
    await watcher

    held = [rid for rid, result in zip(ids, results, strict=True) if not isinstance(result, BaseException)]
    refused = [result for result in results if isinstance(result, BaseException)]
    assert len(held) == 150
    assert len(refused) == 50
    assert all(isinstance(exc, InsufficientQuota) for exc in refused), refused[:3]
    assert await _account(database, user) == (150 * HOLD, 150 * HOLD)
    assert seen, "the watcher sampled the account while holds were taken"
    assert all(balance - reserved >= 0 and reserved >= 0 for balance, reserved in seen)

    await asyncio.gather(*(ledgers[i % 2].release(rid) for i, rid in enumerate(held)))

    view = await ledgers[0].balance(user, consistent=True)
    assert (view.reserved_micros, view.available_micros) == (0, view.balance_micros)
    assert view.balance_micros == 150 * HOLD


async def test_same_reservation_id_raced_from_two_processes_holds_once(
    ledgers: tuple[Ledger, Ledger], prices: PriceBook, database: Database
) -> None:
    model = await priced_model(prices)
    user = await funded_user(ledgers[0], 100 * HOLD)
    rid = reservation_id()

    holds = await asyncio.gather(
        *(
            ledgers[i % 2].reserve(
                reservation_id=rid,
                user_id=user,
                model=model.model,
                prompt_tokens=PROMPT,
                max_output_tokens=MAX_OUTPUT,
            )
            for i in range(20)
        )
    )

    assert sum(not hold.repeated for hold in holds) == 1
    assert {hold.reserved_micros for hold in holds} == {HOLD}
    assert await _account(database, user) == (100 * HOLD, HOLD)


async def test_settle_and_release_raced_charge_at_most_once(
    ledgers: tuple[Ledger, Ledger], prices: PriceBook, database: Database
) -> None:
    model = await priced_model(prices)
    user = await funded_user(ledgers[0], 100 * HOLD)
    usage = Usage(prompt_tokens=100, completion_tokens=50)
    charged = 0
    for _ in range(20):
        rid = reservation_id()
        await ledgers[0].reserve(
            reservation_id=rid,
            user_id=user,
            model=model.model,
            prompt_tokens=PROMPT,
            max_output_tokens=MAX_OUTPUT,
        )

        outcomes: tuple[Outcome, ...] = await asyncio.gather(
            ledgers[0].settle(rid, usage),
            ledgers[1].release(rid, "client gone"),
            ledgers[1].settle(rid, usage),
            ledgers[0].release(rid),
        )

        winners = [o for o in outcomes if not o.repeated]
        assert len(winners) == 1, outcomes
        assert {(o.state, o.charged_micros) for o in outcomes} == {
            (winners[0].state, winners[0].charged_micros)
        }
        entries = await charges_for(database, rid)
        assert len(entries) == (1 if winners[0].state == "settled" else 0)
        charged += winners[0].charged_micros

    assert await _account(database, user) == (100 * HOLD - charged, 0)
    assert await ledgers[0].reconcile(consistent=True) == []


@dataclass
class _World:
    users: list[str]
    held: dict[str, str] = field(default_factory=dict)  # reservation id -> user
    reserved: int = 0
    refused: int = 0


async def test_randomized_mixed_workload_reconciles(
    ledgers: tuple[Ledger, Ledger], prices: PriceBook, database: Database, clock: ManualClock
) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    models_ = [await priced_model(prices, per_request=rng.randrange(0, 50)) for _ in range(3)]
    # One user can afford almost nothing, so refusals happen whatever the seed (with five well-funded
    # users, some seeds refused nothing).
    funds = [100] + [rng.randrange(2_000, 20_000) for _ in range(4)]
    world = _World(users=[await funded_user(ledgers[0], amount) for amount in funds])

    async def reserve(ledger: Ledger) -> None:
        user = rng.choice(world.users)
        rid = reservation_id()
        try:
            await ledger.reserve(
                reservation_id=rid,
                user_id=user,
                model=rng.choice(models_).model,
                prompt_tokens=rng.randrange(0, 400),
                max_output_tokens=rng.randrange(0, 600),
            )
        except InsufficientQuota:
            world.refused += 1
            return
        world.held[rid] = user
        world.reserved += 1

    async def settle(ledger: Ledger, rid: str) -> None:
        prompt = rng.randrange(0, 800)
        usage = Usage(
            prompt_tokens=prompt,
            cached_prompt_tokens=rng.randrange(0, prompt + 1),
            completion_tokens=rng.randrange(0, 1200),  # sometimes above the hold: capped
            estimated=rng.random() < 0.1,
        )
        await ledger.settle(rid, usage)

    async def top_up(ledger: Ledger) -> None:
        user = rng.choice(world.users)
        amount = rng.choice([rng.randrange(1, 3_000), -rng.randrange(1, 3_000)])
        key = rng.choice(["", f"k{rng.randrange(20)}-{user}"])
        with contextlib.suppress(InvalidRequest):  # an adjustment below what is held is refused
            await ledger.top_up(user_id=user, amount_micros=amount, idempotency_key=key)

    for _ in range(30):
        batch: list[Coroutine[Any, Any, object]] = []
        for _ in range(10):
            ledger = rng.choice(ledgers)
            roll = rng.random()
            if roll < 0.4 or not world.held:
                batch.append(reserve(ledger))
            elif roll < 0.7:
                batch.append(settle(ledger, rng.choice(list(world.held))))
            elif roll < 0.85:
                batch.append(ledger.release(rng.choice(list(world.held)), "random"))
            else:
                batch.append(top_up(ledger))
        await asyncio.gather(*batch)
        if rng.random() < 0.1:
            clock.advance(TTL_S)
            await rng.choice(ledgers).expire_due()

    context = f"seed={seed}"
    assert await ledgers[0].reconcile(consistent=True) == [], context
    assert await ledgers[1].reconcile(consistent=True) == [], context
    assert world.reserved > 20 and world.refused > 0, context
    account, reservation, entry = models.Account, models.Reservation, models.LedgerEntry
    async with database.reader(consistent=True) as session:
        broken = await session.scalar(
            select(func.count())
            .select_from(account)
            .where((account.reserved_micros < 0) | (account.balance_micros < account.reserved_micros))
        )
        # Each settled reservation has exactly one charge entry, for exactly what it charged; released
        # and expired ones have none (no usage event came after its hold here to charge it late).
        finished = (
            await session.execute(
                select(
                    reservation.id,
                    reservation.charged_micros,
                    func.count(entry.id),
                    func.sum(entry.amount_micros),
                )
                .outerjoin(entry, entry.reservation_id == reservation.id)
                .where(reservation.user_id.in_(world.users), reservation.state == "settled")
                .group_by(reservation.id, reservation.charged_micros)
            )
        ).all()
        released_entries = await session.scalar(
            select(func.count(entry.id))
            .join(reservation, entry.reservation_id == reservation.id)
            .where(reservation.state.in_(["released", "expired"]))
        )
    assert broken == 0, context
    assert finished, context
    assert all(count == 1 and -int(total) == charged for _, charged, count, total in finished), context
    assert released_entries == 0, context
