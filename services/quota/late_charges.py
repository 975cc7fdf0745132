"""Late charges of exact reservations: a usage event that reaches quota after its reservation was
finished without a charge is charged by the rule leases follow.

An exact reservation is normally finished by its usage event (``Ledger.settle_charged``). When the
event comes after the hold is gone, because the sweeper expired it (a Kafka outage or a consumer lag
longer than ``RELAYGATE_RESERVATION_TTL_S``) or because it was released as if nothing had been
delivered, the event is still the truth about the request: its relay logged that cost. Such a *late
charge* is decided by :meth:`services.quota.credit.CreditBooks.charge`, the rule every lease charge
follows: nothing is held for it any more, so it takes what the user's balance has free (balance minus
every other hold) and what each budget window of the reservation has left, and what even that cannot
cover is *written off*: on the books as cost (``ledger_entries.written_off_micros``), never taken
from a balance. It never charges more than the same event would have charged on time: without
overage, and for an estimated usage, at most the reservation's hold (flag ``capped``).

Concurrent late charges share a transaction (:class:`~services.quota.group_commit.GroupCommit`, as
reserves and settles do), because late events come in bursts: every exact request of an outage
longer than the TTL is one. Per batch: lock the reservations, then their users' accounts, then their
budget windows (the order of :mod:`services.quota.book_locks`, shared by every transaction on the
books), load them into one :class:`~services.quota.credit.CreditBooks`, charge each event there in
arrival order, and write back: balances, the windows' spend, each reservation's ``charged_micros``
and usage, and each request's one ledger entry (``reservation_id`` = the request id, flags ``late``
and, as for leases, ``beyond_hold`` / ``written_off``). That entry makes it idempotent: a replay, a
second consumer, or a Settle racing the event finds it under the reservation's lock and changes
nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import JSON, bindparam, insert, update
from sqlalchemy.ext.asyncio import AsyncConnection

from services.common.credit import RESERVATION, Charge, CreditTerms
from services.common.db import Database
from services.common.errors import NotFound
from services.common.pricing import Usage
from services.quota import models
from services.quota.book_locks import BookLocks
from services.quota.budgets import WindowKey
from services.quota.credit import CLOSED, Account, CreditBooks, Hold, Posted, Window
from services.quota.group_commit import GroupCommit
from services.quota.models import ACCOUNTS, ENTRIES, RESERVATIONS, USAGE
from services.quota.settlement import (
    FLAG_BEYOND_HOLD,
    FLAG_CAPPED,
    FLAG_LATE,
    FLAG_WRITTEN_OFF,
    Outcome,
    repeated,
    windows_of,
)

__all__ = ["LATE_STATES", "LateCharge", "LateCharges"]

# The finished states whose reservation charged nothing, so that its event may still charge it.
LATE_STATES = (models.EXPIRED, models.RELEASED)

_A = ACCOUNTS.c
_R = RESERVATIONS.c
_L = ENTRIES.c
_U = USAGE.c

# The credit books only need terms for leases; a charge reads none of them.
_TERMS = CreditTerms()


def _window_id(key: WindowKey) -> str:
    return f"{key.scope}:{key.scope_id}:{key.period}:{key.window_start}"


@dataclass(frozen=True, slots=True)
class LateCharge:
    """The usage event of a reservation that may have finished without a charge."""

    reservation_id: str
    usage: Usage
    cost_micros: int
    now: int


@dataclass(slots=True)
class _Planned:
    """A late charge this batch makes: the event, its locked reservation, what it may charge."""

    op: LateCharge
    row: Any
    billable: int
    posted: Posted | None = None
    flags: tuple[str, ...] = ()


class LateCharges:
    """Charges exact reservations late (see the module docstring)."""

    def __init__(
        self, db: Database, *, allow_overage: bool, max_batch: int = 64, concurrency: int = 1
    ) -> None:
        self._db = db
        self._allow_overage = allow_overage
        pg = db.dialect == "postgresql"
        self._locks = BookLocks(postgres=pg)
        self._set_balances = (
            update(ACCOUNTS)
            .where(_A.user_id == bindparam("uid"))
            .values(balance_micros=bindparam("balance"), updated_at=bindparam("now"))
        )
        self._set_spent = (
            update(USAGE)
            .where(
                _U.scope == bindparam("w_scope"),
                _U.scope_id == bindparam("w_sid"),
                _U.period == bindparam("w_period"),
                _U.window_start == bindparam("w_start"),
            )
            .values(spent_micros=bindparam("spent"), updated_at=bindparam("now"))
        )
        self._charge_reservations = (
            update(RESERVATIONS)
            .where(_R.id == bindparam("rid"))
            .values(charged_micros=bindparam("charged"), usage=bindparam("usage_json", type_=JSON()))
        )
        self._insert_entries = insert(ENTRIES)
        self._commit = GroupCommit[LateCharge, Outcome](
            "late_charges", self._execute, max_batch=max_batch, concurrency=concurrency
        )

    async def charge(self, reservation_id: str, usage: Usage, cost_micros: int, now: int) -> Outcome:
        """Charge the event of a reservation that finished without a charge.

        Returns the outcome with ``repeated=False`` when this call charged it; the stored outcome with
        ``repeated=True`` when the request was charged already (an earlier event, or a Settle) or its
        reservation is not finished in one of :data:`LATE_STATES`. Raises :class:`NotFound` for an
        unknown reservation.
        """
        return await self._commit.submit(LateCharge(reservation_id, usage, cost_micros, now))

    async def close(self) -> None:
        """Wait for the batches in flight."""
        await self._commit.close()

    async def _execute(self, batch: Sequence[LateCharge]) -> list[Outcome | BaseException]:
        now = max(op.now for op in batch)
        async with self._db.primary.begin() as conn:
            ids = sorted({op.reservation_id for op in batch})
            rows = {
                str(row.id): row for row in await conn.execute(self._locks.lock_reservations, {"ids": ids})
            }
            # Per operation: a planned charge, the index of the one it repeats, or a stored answer.
            plans: list[_Planned | int | Outcome | BaseException] = []
            first: dict[str, int] = {}
            for i, op in enumerate(batch):
                row = rows.get(op.reservation_id)
                if row is None:
                    plans.append(
                        NotFound(f"reservation {op.reservation_id!r} does not exist", param="reservation_id")
                    )
                elif op.reservation_id in first:
                    plans.append(first[op.reservation_id])
                elif row.state not in LATE_STATES or row.entry_id is not None or op.cost_micros <= 0:
                    plans.append(repeated(None, row))
                else:
                    first[op.reservation_id] = i
                    capped = op.usage.estimated or not self._allow_overage
                    billable = min(op.cost_micros, int(row.reserved_micros)) if capped else op.cost_micros
                    plans.append(_Planned(op, row, billable))
            planned = [plan for plan in plans if isinstance(plan, _Planned)]
            if planned:
                books, keys = await self._load(conn, planned)
                for plan in planned:
                    plan.posted = books.charge(
                        Charge(
                            request_id=str(plan.row.id),
                            hold_id=str(plan.row.id),
                            key_id=str(plan.row.key_id),
                            user_id=str(plan.row.user_id),
                            cost_micros=plan.billable,
                        )
                    )
                    plan.flags = _flags(plan.posted, capped=plan.billable < plan.op.cost_micros)
                await self._write(conn, planned, books, keys, now)
        results: list[Outcome | BaseException] = []
        for step in plans:
            if isinstance(step, int):
                # The same event twice in one batch: the second finds what the first charged.
                done = results[step]
                results.append(
                    dataclasses.replace(done, repeated=True, written_off_micros=0)
                    if isinstance(done, Outcome)
                    else done
                )
            else:
                results.append(_outcome(step) if isinstance(step, _Planned) else step)
        return results

    async def _load(
        self, conn: AsyncConnection, planned: list[_Planned]
    ) -> tuple[CreditBooks, dict[str, WindowKey]]:
        """Lock the accounts, then the budget windows, and build the books of the batch's charges."""
        rows = [plan.row for plan in planned]
        users = sorted({str(row.user_id) for row in rows})
        accounts = {
            str(r[0]): Account(int(r[1]), int(r[2]))
            for r in await conn.execute(self._locks.lock_accounts, {"users": users})
        }
        keys = {_window_id(key): key for row in rows for key in windows_of(row)}
        windows: dict[str, Window] = {}
        if keys:
            params = {
                "sids": sorted({k.scope_id for k in keys.values()}),
                "starts": sorted({k.window_start for k in keys.values()}),
            }
            # The most the batch could charge in any window: a window with no cap recorded bounds
            # nothing (the exact path's ``Books.room`` reads it so too).
            unbounded = sum(plan.billable for plan in planned)
            for r in await conn.execute(self._locks.lock_windows, params):
                wid = _window_id(WindowKey(str(r[0]), str(r[1]), str(r[2]), int(r[3])))
                if wid in keys:
                    spent, held, cap = int(r[4]), int(r[5]), int(r[6])
                    windows[wid] = Window(cap=cap or spent + held + unbounded, spent=spent, held=held)
        holds = {
            str(row.id): Hold(
                hold_id=str(row.id),
                kind=RESERVATION,
                key_id=str(row.key_id),
                user_id=str(row.user_id),
                # Every window the reservation counted in: a late charge is spent there as it would
                # have been on time, within what each has left.
                windows=tuple(wid for key in windows_of(row) if (wid := _window_id(key)) in windows),
                expires_at=0,
                state=CLOSED,
                # The hold was given up (expired or released): its charge may only come from what is
                # free.
                expired=True,
            )
            for row in rows
        }
        books = CreditBooks(
            terms=_TERMS, windows_of=_no_windows, accounts=accounts, windows=windows, holds=holds
        )
        return books, {wid: keys[wid] for wid in windows}

    async def _write(
        self,
        conn: AsyncConnection,
        planned: list[_Planned],
        books: CreditBooks,
        keys: dict[str, WindowKey],
        now: int,
    ) -> None:
        charged = [plan for plan in planned if plan.posted is not None and plan.posted.charged]
        # Absolute values, decided on the rows locked above; only what a charge changed.
        users = sorted({str(plan.row.user_id) for plan in charged})
        if users:
            await conn.execute(
                self._set_balances,
                [{"uid": user, "balance": books.accounts[user].balance, "now": now} for user in users],
            )
        touched = sorted({wid for plan in charged for wid in books.holds[str(plan.row.id)].windows})
        if touched:
            await conn.execute(
                self._set_spent,
                [
                    {
                        "w_scope": keys[wid].scope,
                        "w_sid": keys[wid].scope_id,
                        "w_period": keys[wid].period,
                        "w_start": keys[wid].window_start,
                        "spent": books.windows[wid].spent,
                        "now": now,
                    }
                    for wid in touched
                ],
            )
        await conn.execute(
            self._charge_reservations,
            [
                {
                    "rid": plan.row.id,
                    "charged": int(plan.row.charged_micros) + _posted(plan).charged,
                    "usage_json": plan.op.usage.as_json(),
                }
                for plan in planned
            ],
        )
        # In request id order, so two batches racing on the same requests wait on each other's unique
        # keys in one order.
        await conn.execute(
            self._insert_entries,
            [
                {
                    "user_id": str(plan.row.user_id),
                    "kind": "charge",
                    "amount_micros": -_posted(plan).charged,
                    "reservation_id": plan.row.id,
                    "hold_id": plan.row.id,
                    "price_id": plan.row.price_id,
                    "idempotency_key": None,
                    "actor": "",
                    "reason": "",
                    "flags": ",".join(plan.flags),
                    "created_at": plan.op.now,
                    "written_off_micros": _posted(plan).written_off,
                }
                for plan in sorted(planned, key=lambda plan: str(plan.row.id))
            ],
        )


def _posted(plan: _Planned) -> Posted:
    if plan.posted is None:
        raise AssertionError(f"late charge {plan.op.reservation_id} was planned but not charged")
    return plan.posted


def _outcome(plan: _Planned) -> Outcome:
    row, posted = plan.row, _posted(plan)
    return Outcome(
        reservation_id=str(row.id),
        state=str(row.state),
        charged_micros=int(row.charged_micros) + posted.charged,
        reserved_micros=int(row.reserved_micros),
        price_id=int(row.price_id),
        repeated=False,
        flags=plan.flags,
        user_id=str(row.user_id),
        key_id=str(row.key_id),
        leases=int(row.leases),
        written_off_micros=posted.written_off,
    )


def _flags(posted: Posted, *, capped: bool) -> tuple[str, ...]:
    flags = [FLAG_LATE]
    if posted.beyond_hold:
        flags.append(FLAG_BEYOND_HOLD)
    if posted.written_off:
        flags.append(FLAG_WRITTEN_OFF)
    if capped:
        flags.append(FLAG_CAPPED)
    return tuple(flags)


def _no_windows(_key_id: str, _user_id: str) -> tuple[str, ...]:
    return ()
