"""A transaction that holds and finishes at once locks every row it changes in the shared order.

Reserves and finishes share transactions (group commit). A batch that locks its holds' accounts and
windows must lock its finishes' rows in the same statements: left to its final updates, they would be
locked after rows that come later in the shared order, and a concurrent batch taking them in that
order deadlocks with it (seen with two quota processes under a mixed workload). Here the statements a
mixed batch sends are read off the connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event

from services.common.clock import ManualClock
from services.common.db import Database
from services.quota.budgets import Budgets, Calendar
from services.quota.ledger import BatchPolicy, Ledger
from services.quota.pricing import PriceBook, Usage
from tests.quota.factories import funded_user, priced_model, reservation_id
from tests.quota.fixtures import TTL_S


@contextmanager
def statements(database: Database) -> Iterator[list[tuple[str, Any]]]:
    """Every statement sent to the primary meanwhile, with its parameters."""
    sent: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        sent.append((statement, parameters))

    engine = database.primary.sync_engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(engine, "before_cursor_execute", record)


def locked_ids(sent: list[tuple[str, Any]], table: str) -> list[set[str]]:
    """Per locking read of ``table``: the ids it locked (its first array parameter)."""
    found = []
    for statement, parameters in sent:
        if f"FROM {table}" in statement and "FOR UPDATE" in statement:
            found.append({str(v) for v in next(p for p in parameters if isinstance(p, list | tuple))})
    return found


async def test_a_batch_of_holds_and_finishes_locks_the_finishes_accounts_and_windows_with_the_holds(
    database: Database, prices: PriceBook, clock: ManualClock
) -> None:
    # One transaction at a time: what is submitted while one runs shares the next.
    ledger = Ledger(
        database,
        prices,
        clock=clock,
        reservation_ttl_s=TTL_S,
        batching=BatchPolicy(max_batch=8, concurrency=1),
    )
    budgets = Budgets(database, clock=clock, calendar=Calendar())
    model = await priced_model(prices)
    finishing, holding, other = [await funded_user(ledger, 1_000_000) for _ in range(3)]
    for user in (finishing, holding):
        await budgets.set_budget(scope="user", scope_id=user, period="month", limit_micros=500_000)
    held = reservation_id()
    await ledger.reserve(reservation_id=held, user_id=finishing, model=model.model, prompt_tokens=10)

    async def reserve(user: str) -> None:
        await ledger.reserve(
            reservation_id=reservation_id(), user_id=user, model=model.model, prompt_tokens=10
        )

    with statements(database) as sent:
        first = asyncio.create_task(reserve(other))
        await asyncio.sleep(0)  # its batch has started: the next two share one
        mixed = [
            asyncio.create_task(reserve(holding)),
            asyncio.create_task(ledger.settle(held, Usage(prompt_tokens=10))),
        ]
        await asyncio.gather(first, *mixed)

    accounts = locked_ids(sent, "accounts")
    windows = locked_ids(sent, "budget_usage")
    # The mixed batch's locking reads: the settled hold's user and window are among them.
    assert any({holding, finishing} <= ids for ids in accounts), accounts
    assert any({holding, finishing} <= ids for ids in windows), windows
    assert await ledger.reconcile(consistent=True) == []
