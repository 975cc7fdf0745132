"""Posting: one transaction on the primary that records a whole batch of reserves and finishes
(settle, release, expiry), as :mod:`services.quota.group_commit` hands them over.

Per batch:

1. lock the batch's reservations that exist (``SELECT ... FOR UPDATE``, in id order): the ones to
   finish, and any a Reserve repeats;
2. read the budgets of the new holds' keys and users;
3. lock the accounts involved (in user id order), then the budget windows involved, creating the
   windows new holds need (in key order);
4. decide each operation in arrival order against those rows as changed by the operations before it
   (:class:`Books`): holds in :mod:`services.quota.holding`, finishes in :mod:`services.quota.settlement`;
5. write everything with one statement per table: new reservations, finished reservations, the net
   change of each account and window, and one ``charge`` ledger entry per settled hold.

Every transaction takes its locks in the order reservations < accounts < budget windows, each set
sorted, so concurrent batches in any number of processes cannot deadlock. Decisions are made on
locked rows, so N parallel requests against a balance worth N-1 holds get exactly N-1, batched
together or not. Two reserves of one id racing in different processes both insert; the loser's batch
fails on the primary key, the group commit retries its operations one by one, and the single reserve
that lost answers with the winner's hold.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    bindparam,
    case,
    insert,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from services.common.db import Database
from services.common.errors import NotFound
from services.quota import models
from services.quota.book_locks import BookLocks, window_row
from services.quota.budgets import Calendar, WindowKey
from services.quota.holding import (
    Hold,
    HoldRequest,
    budget_windows,
    decide_hold,
    duplicate,
    repeat,
    reservation_row,
)
from services.quota.models import ACCOUNTS, BUDGETS, ENTRIES, RESERVATIONS, USAGE
from services.quota.pricing import PriceBook
from services.quota.settlement import Charge, FinishRequest, Outcome, charge_for, repeated, windows_of

__all__ = ["Books", "Operation", "Posting", "Result"]

Operation = HoldRequest | FinishRequest
# A finish answers None when it is an expiry that did not happen (finished already, or not due).
Result = Hold | Outcome | None | BaseException

_A = ACCOUNTS.c
_R = RESERVATIONS.c
_B = BUDGETS.c
_L = ENTRIES.c
_U = USAGE.c


class Books:
    """The accounts and budget windows a batch touches: as locked, then as each decision changes them.

    ``account_changes`` and ``window_changes`` accumulate the net change per row, written at the end
    with one statement per table.
    """

    def __init__(
        self, accounts: dict[str, tuple[int, int]], windows: dict[WindowKey, tuple[int, int, int]]
    ) -> None:
        self._accounts = {user: [balance, held] for user, (balance, held) in accounts.items()}
        self._windows = {key: [spent, held, cap] for key, (spent, held, cap) in windows.items()}
        # user -> [charged, change of held]
        self.account_changes: dict[str, list[int]] = {}
        # window -> [charged, change of held, cap in force]
        self.window_changes: dict[WindowKey, list[int]] = {}

    def available(self, user: str) -> int:
        balance, held = self._accounts.get(user, (0, 0))
        return balance - held

    def window_left(self, key: WindowKey, cap: int) -> int:
        spent, held, _ = self._windows.get(key, (0, 0, 0))
        return cap - spent - held

    def room(self, user: str, windows: list[WindowKey], released: int) -> int:
        """What a finishing hold of ``released`` may charge at most: what the balance, and each of its
        budget windows, covers beyond every other hold."""
        balance, held = self._accounts.get(user, (0, 0))
        room = balance - (held - released)
        for key in windows:
            spent, window_held, cap = self._windows.get(key, (0, 0, 0))
            if cap:
                room = min(room, cap - spent - (window_held - released))
        return room

    def hold(self, user: str, amount: int, windows: list[tuple[WindowKey, int]]) -> None:
        self._accounts.setdefault(user, [0, 0])[1] += amount
        self.account_changes.setdefault(user, [0, 0])[1] += amount
        for key, cap in windows:
            window = self._windows.setdefault(key, [0, 0, cap])
            window[1] += amount
            window[2] = cap
            change = self.window_changes.setdefault(key, [0, 0, cap])
            change[1] += amount
            change[2] = cap

    def finish(self, user: str, windows: list[WindowKey], *, charged: int, released: int) -> None:
        if charged == 0 and released == 0:
            # Free requests hold nothing, and their user may have no account at all.
            return
        account = self._accounts.setdefault(user, [0, 0])
        account[0] -= charged
        account[1] -= released
        change = self.account_changes.setdefault(user, [0, 0])
        change[0] += charged
        change[1] -= released
        for key in windows:
            window = self._windows.setdefault(key, [0, 0, 0])
            window[0] += charged
            window[1] -= released
            window_change = self.window_changes.setdefault(key, [0, 0, window[2]])
            window_change[0] += charged
            window_change[1] -= released


class Posting:
    """Executes batches of operations (see the module docstring)."""

    def __init__(self, db: Database, prices: PriceBook, calendar: Calendar, *, allow_overage: bool) -> None:
        self._db = db
        self._prices = prices
        self._calendar = calendar
        self._allow_overage = allow_overage
        pg = db.dialect == "postgresql"
        self._locks = BookLocks(postgres=pg)
        self._insert_reservations = insert(RESERVATIONS)
        self._finish_reservations = (
            update(RESERVATIONS)
            .where(_R.id == bindparam("rid"))
            .values(
                state=bindparam("new_state"),
                finished_at=bindparam("now"),
                charged_micros=bindparam("charged"),
                usage=bindparam("usage_json", type_=JSON()),
            )
        )
        self._change_accounts = (
            update(ACCOUNTS)
            .where(_A.user_id == bindparam("uid"))
            .values(
                balance_micros=_A.balance_micros - bindparam("charged"),
                reserved_micros=_A.reserved_micros + bindparam("held"),
                updated_at=bindparam("now"),
            )
        )
        cap = bindparam("cap", type_=BigInteger())
        self._change_windows = (
            update(USAGE)
            .where(
                _U.scope == bindparam("w_scope"),
                _U.scope_id == bindparam("w_sid"),
                _U.period == bindparam("w_period"),
                _U.window_start == bindparam("w_start"),
            )
            .values(
                spent_micros=_U.spent_micros + bindparam("charged"),
                reserved_micros=_U.reserved_micros + bindparam("held"),
                # 0: the batch did not read the window's cap (it only finished holds in it).
                limit_micros=case((cap > 0, cap), else_=_U.limit_micros),
                updated_at=bindparam("now"),
            )
        )
        self._insert_entries = insert(ENTRIES)

    async def execute(self, batch: Sequence[Operation]) -> list[Result]:
        """One result per operation, in order: a :class:`Hold` or an :class:`Outcome`, ``None`` for an
        expiry that did not happen, or the exception that refuses the operation."""
        try:
            return await self._run(batch)
        except IntegrityError:
            if len(batch) > 1 or not isinstance(batch[0], HoldRequest):
                raise  # the group commit retries each operation alone
            return [await self._lost_race(batch[0])]

    async def _lost_race(self, op: HoldRequest) -> Result:
        """This reserve lost a race with another of the same id: answer with the one that won."""
        async with self._db.reader(consistent=True) as session:
            conn = await session.connection()
            row = (
                await conn.execute(self._locks.lock_reservations, {"ids": [op.reservation_id]})
            ).one_or_none()
            if row is None:
                raise LookupError(f"reservation {op.reservation_id!r} vanished after a duplicate insert")
            accounts = {
                str(r[0]): (int(r[1]), int(r[2]))
                for r in await conn.execute(self._locks.accounts, {"users": [row.user_id]})
            }
        balance, held = accounts.get(str(row.user_id), (0, 0))
        return repeat(row, str(row.state), op, await self._prices.by_id(int(row.price_id)), balance - held)

    async def _run(self, batch: Sequence[Operation]) -> list[Result]:
        now = max(op.now if isinstance(op, FinishRequest) else op.created_at for op in batch)
        results: list[Result] = [None] * len(batch)
        # A Core connection straight from the engine: an ORM session would only add bookkeeping.
        async with self._db.primary.begin() as conn:
            ids = sorted({op.reservation_id for op in batch})
            rows = {row.id: row for row in await conn.execute(self._locks.lock_reservations, {"ids": ids})}
            first_hold: dict[str, int] = {}
            fresh: list[HoldRequest] = []
            for i, op in enumerate(batch):
                if isinstance(op, HoldRequest) and op.reservation_id not in first_hold:
                    first_hold[op.reservation_id] = i
                    if op.reservation_id not in rows:
                        fresh.append(op)
            hold_windows = await self._hold_windows(conn, fresh)
            books = await self._lock_books(conn, batch, rows, hold_windows, now)

            finished: dict[str, Outcome] = {}
            new_rows: list[dict[str, Any]] = []
            charges: list[Charge] = []
            for i, op in enumerate(batch):
                row = rows.get(op.reservation_id)
                if isinstance(op, HoldRequest):
                    j = first_hold[op.reservation_id]
                    if j != i:
                        results[i] = duplicate(
                            op, cast(HoldRequest, batch[j]), cast(Hold | BaseException, results[j])
                        )
                    elif row is not None:
                        done = finished.get(row.id)
                        price = await self._prices.by_id(int(row.price_id))
                        state = done.state if done is not None else str(row.state)
                        results[i] = repeat(row, state, op, price, books.available(op.user_id))
                    else:
                        windows = hold_windows.get(op.reservation_id, [])
                        results[i] = decide_hold(op, windows, books, self._calendar)
                        if isinstance(results[i], Hold):
                            new_rows.append(reservation_row(op, windows))
                    continue
                if row is None:
                    if op.target != models.EXPIRED:
                        results[i] = NotFound(
                            f"reservation {op.reservation_id!r} does not exist", param="reservation_id"
                        )
                    continue
                done = finished.get(row.id)
                if done is not None or row.state != models.HELD:
                    if op.target != models.EXPIRED:
                        results[i] = repeated(done, row)
                    continue
                if op.target == models.EXPIRED and int(row.expires_at) > op.now:
                    continue
                charge = await charge_for(op, row, self._prices, books, allow_overage=self._allow_overage)
                charges.append(charge)
                finished[row.id] = results[i] = charge.outcome()
            await self._write(conn, new_rows, charges, books, now)
        return results

    async def _hold_windows(
        self, conn: AsyncConnection, fresh: list[HoldRequest]
    ) -> dict[str, list[tuple[WindowKey, int]]]:
        """The budget windows (and caps) of each new paid hold, with the budgets read now."""
        paid = [op for op in fresh if op.amount > 0]
        if not paid:
            return {}
        sids = sorted({op.user_id for op in paid} | {op.key_id for op in paid if op.key_id})
        stored = {
            (str(r[0]), str(r[1]), str(r[2])): int(r[3])
            for r in await conn.execute(self._locks.stored_budgets, {"sids": sids})
        }
        found = {op.reservation_id: budget_windows(op, stored) for op in paid}
        return {rid: windows for rid, windows in found.items() if windows}

    async def _lock_books(
        self,
        conn: AsyncConnection,
        batch: Sequence[Operation],
        rows: dict[str, Any],
        hold_windows: dict[str, list[tuple[WindowKey, int]]],
        now: int,
    ) -> Books:
        """Lock the accounts, then the budget windows, that decisions read; create missing windows.

        Holds read their user's account and windows. Finishes only subtract from theirs, which a batch
        of finishes alone locks with its final updates, in the same order (accounts, then windows, each
        sorted). A batch that locks for its holds here locks its finishes' rows here too, in the same
        statements: were they left to the final updates, it would lock an account after a window, or
        one window after another it locked out of order, and a concurrent batch taking the rows in
        the shared order would deadlock with it (seen with two quota processes under mixed load).
        An overage, bounded by what is left, needs the finishes' rows read in any case.
        """
        holding = any(isinstance(op, HoldRequest) for op in batch)
        finishing = (
            [
                rows[op.reservation_id]
                for op in batch
                if isinstance(op, FinishRequest) and op.reservation_id in rows
            ]
            if self._allow_overage or holding
            else []
        )
        users = {op.user_id for op in batch if isinstance(op, HoldRequest)} | {
            str(r.user_id) for r in finishing
        }
        accounts: dict[str, tuple[int, int]] = {}
        if users:
            accounts = {
                str(r[0]): (int(r[1]), int(r[2]))
                for r in await conn.execute(self._locks.lock_accounts, {"users": sorted(users)})
            }
        new_keys = sorted({key for windows in hold_windows.values() for key, _ in windows})
        keys = set(new_keys) | {
            key for row in finishing if row.state == models.HELD for key in windows_of(row)
        }
        windows: dict[WindowKey, tuple[int, int, int]] = {}
        if keys:
            if new_keys:
                await conn.execute(self._locks.new_windows, [window_row(key, now) for key in new_keys])
            params = {
                "sids": sorted({k.scope_id for k in keys}),
                "starts": sorted({k.window_start for k in keys}),
            }
            windows = {
                WindowKey(str(r[0]), str(r[1]), str(r[2]), int(r[3])): (int(r[4]), int(r[5]), int(r[6]))
                for r in await conn.execute(self._locks.lock_windows, params)
            }
        return Books(accounts, windows)

    async def _write(
        self,
        conn: AsyncConnection,
        new_rows: list[dict[str, Any]],
        charges: list[Charge],
        books: Books,
        now: int,
    ) -> None:
        if new_rows:
            await conn.execute(self._insert_reservations, new_rows)
        if charges:
            await conn.execute(
                self._finish_reservations,
                [
                    {
                        "rid": c.row.id,
                        "new_state": c.op.target,
                        "now": c.op.now,
                        "charged": c.charged,
                        "usage_json": c.op.usage.as_json() if c.op.usage is not None else {},
                    }
                    for c in charges
                ],
            )
        accounts = [
            {"uid": user, "charged": charged, "held": held, "now": now}
            for user, (charged, held) in sorted(books.account_changes.items())
            if charged or held
        ]
        if accounts:
            await conn.execute(self._change_accounts, accounts)
        windows = [
            {
                "w_scope": key.scope,
                "w_sid": key.scope_id,
                "w_period": key.period,
                "w_start": key.window_start,
                "charged": charged,
                "held": held,
                "cap": cap,
                "now": now,
            }
            for key, (charged, held, cap) in sorted(books.window_changes.items())
        ]
        if windows:
            await conn.execute(self._change_windows, windows)
        entries = [
            {
                "user_id": c.row.user_id,
                "kind": "charge",
                "amount_micros": -c.charged,
                "reservation_id": c.row.id,
                "hold_id": c.row.id,
                "price_id": c.row.price_id,
                "idempotency_key": None,
                "actor": "",
                "reason": "",
                "flags": ",".join(c.flags),
                "created_at": c.op.now,
            }
            for c in charges
            # Release and expiry charge nothing and leave the request's entry to a late usage event.
            if c.op.target == models.SETTLED
        ]
        if entries:
            await conn.execute(self._insert_entries, entries)
