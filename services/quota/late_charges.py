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

One transaction per late charge: lock the reservation, then its user's account, then its budget
windows (the order of :mod:`services.quota.book_locks`, shared by every transaction on the books),
load them into a :class:`~services.quota.credit.CreditBooks`, charge there, and write back: the
account's balance, the windows' spend, the reservation's ``charged_micros`` and usage, and the one
ledger entry of the request (``reservation_id`` = the request id, flags ``late`` and, as for leases,
``beyond_hold`` / ``written_off``). That entry makes it idempotent: a replay, a second consumer, or a
Settle racing the event finds it under the reservation's lock and changes nothing. Late events are
rare (they need an outage longer than the TTL), so they do not share the group commit's batches.
"""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import JSON, Table, bindparam, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from services.common.credit import RESERVATION, Charge, CreditTerms
from services.common.db import Database
from services.common.errors import NotFound
from services.common.pricing import Usage
from services.quota import models
from services.quota.book_locks import BookLocks
from services.quota.budgets import WindowKey
from services.quota.credit import CLOSED, Account, CreditBooks, Hold, Posted, Window
from services.quota.settlement import (
    FLAG_BEYOND_HOLD,
    FLAG_CAPPED,
    FLAG_LATE,
    FLAG_WRITTEN_OFF,
    Outcome,
    repeated,
    windows_of,
)

__all__ = ["LATE_STATES", "LateCharges"]

# The finished states whose reservation charged nothing, so that its event may still charge it.
LATE_STATES = (models.EXPIRED, models.RELEASED)

_A = cast(Table, models.Account.__table__).c
_R = cast(Table, models.Reservation.__table__).c
_L = cast(Table, models.LedgerEntry.__table__).c
_U = cast(Table, models.BudgetUsage.__table__).c
_ACCOUNTS = cast(Table, models.Account.__table__)
_RESERVATIONS = cast(Table, models.Reservation.__table__)
_ENTRIES = cast(Table, models.LedgerEntry.__table__)
_USAGE = cast(Table, models.BudgetUsage.__table__)

# The credit books only need terms for leases; a charge reads none of them.
_TERMS = CreditTerms()


def _window_id(key: WindowKey) -> str:
    return f"{key.scope}:{key.scope_id}:{key.period}:{key.window_start}"


class LateCharges:
    """Charges exact reservations late (see the module docstring)."""

    def __init__(self, db: Database, *, allow_overage: bool) -> None:
        self._db = db
        self._allow_overage = allow_overage
        self._locks = BookLocks(postgres=db.dialect == "postgresql")
        self._lock_reservation = (
            select(
                _R.id,
                _R.user_id,
                _R.key_id,
                _R.state,
                _R.price_id,
                _R.reserved_micros,
                _R.charged_micros,
                _R.budget_windows,
                _R.day_start,
                _R.month_start,
                _R.leases,
                _L.id.label("entry_id"),
                _L.flags,
            )
            .select_from(_RESERVATIONS.outerjoin(_ENTRIES, _L.reservation_id == _R.id))
            .where(_R.id == bindparam("rid"), _R.kind == models.RESERVATION)
            .with_for_update(of=_RESERVATIONS)
        )
        self._set_balance = (
            update(_ACCOUNTS)
            .where(_A.user_id == bindparam("uid"))
            .values(balance_micros=bindparam("balance"), updated_at=bindparam("now"))
        )
        self._set_spent = (
            update(_USAGE)
            .where(
                _U.scope == bindparam("w_scope"),
                _U.scope_id == bindparam("w_sid"),
                _U.period == bindparam("w_period"),
                _U.window_start == bindparam("w_start"),
            )
            .values(spent_micros=bindparam("spent"), updated_at=bindparam("now"))
        )
        self._charge_reservation = (
            update(_RESERVATIONS)
            .where(_R.id == bindparam("rid"))
            .values(charged_micros=bindparam("charged"), usage=bindparam("usage_json", type_=JSON()))
        )
        self._insert_entry = insert(_ENTRIES)

    async def charge(self, reservation_id: str, usage: Usage, cost_micros: int, now: int) -> Outcome:
        """Charge the event of a reservation that finished without a charge.

        Returns the outcome with ``repeated=False`` when this call charged it; the stored outcome with
        ``repeated=True`` when the request was charged already (an earlier event, or a Settle) or its
        reservation is not finished in one of :data:`LATE_STATES`. Raises :class:`NotFound` for an
        unknown reservation.
        """
        async with self._db.primary.begin() as conn:
            row = (await conn.execute(self._lock_reservation, {"rid": reservation_id})).one_or_none()
            if row is None:
                raise NotFound(f"reservation {reservation_id!r} does not exist", param="reservation_id")
            if row.state not in LATE_STATES or row.entry_id is not None or cost_micros <= 0:
                return repeated(None, row)
            billable = cost_micros
            if usage.estimated or not self._allow_overage:
                billable = min(cost_micros, int(row.reserved_micros))
            books, keys = await self._load(conn, row, billable)
            posted = books.charge(
                Charge(
                    request_id=str(row.id),
                    hold_id=str(row.id),
                    key_id=str(row.key_id),
                    user_id=str(row.user_id),
                    cost_micros=billable,
                )
            )
            flags = _flags(posted, capped=billable < cost_micros)
            await self._write(conn, row, books, keys, posted, usage, flags, now)
        return Outcome(
            reservation_id=str(row.id),
            state=str(row.state),
            charged_micros=int(row.charged_micros) + posted.charged,
            reserved_micros=int(row.reserved_micros),
            price_id=int(row.price_id),
            repeated=False,
            flags=flags,
            user_id=str(row.user_id),
            key_id=str(row.key_id),
            leases=int(row.leases),
            written_off_micros=posted.written_off,
        )

    async def _load(
        self, conn: AsyncConnection, row: Any, cost: int
    ) -> tuple[CreditBooks, dict[str, WindowKey]]:
        """Lock the account, then the budget windows, and build the books of this one charge."""
        user = str(row.user_id)
        accounts = {
            str(r[0]): Account(int(r[1]), int(r[2]))
            for r in await conn.execute(self._locks.lock_accounts, {"users": [user]})
        }
        keys = {_window_id(key): key for key in windows_of(row)}
        windows: dict[str, Window] = {}
        if keys:
            params = {
                "sids": sorted({k.scope_id for k in keys.values()}),
                "starts": sorted({k.window_start for k in keys.values()}),
            }
            for r in await conn.execute(self._locks.lock_windows, params):
                wid = _window_id(WindowKey(str(r[0]), str(r[1]), str(r[2]), int(r[3])))
                if wid in keys:
                    spent, held, cap = int(r[4]), int(r[5]), int(r[6])
                    # No cap recorded bounds nothing (the exact path's ``Books.room`` reads it so too).
                    windows[wid] = Window(cap=cap or spent + held + cost, spent=spent, held=held)
        hold = Hold(
            hold_id=str(row.id),
            kind=RESERVATION,
            key_id=str(row.key_id),
            user_id=user,
            # Every window the reservation counted in: a late charge is spent there as it would have
            # been on time, within what each has left.
            windows=tuple(wid for wid in keys if wid in windows),
            expires_at=0,
            state=CLOSED,
            # The hold was given up (expired or released): its charge may only come from what is free.
            expired=True,
        )
        books = CreditBooks(
            terms=_TERMS,
            windows_of=_no_windows,
            accounts=accounts,
            windows=windows,
            holds={hold.hold_id: hold},
        )
        return books, {wid: keys[wid] for wid in windows}

    async def _write(
        self,
        conn: AsyncConnection,
        row: Any,
        books: CreditBooks,
        keys: dict[str, WindowKey],
        posted: Posted,
        usage: Usage,
        flags: tuple[str, ...],
        now: int,
    ) -> None:
        user = str(row.user_id)
        if posted.charged:
            # Absolute values, decided on the rows locked above.
            await conn.execute(
                self._set_balance, {"uid": user, "balance": books.accounts[user].balance, "now": now}
            )
            windows = [
                {
                    "w_scope": key.scope,
                    "w_sid": key.scope_id,
                    "w_period": key.period,
                    "w_start": key.window_start,
                    "spent": books.windows[wid].spent,
                    "now": now,
                }
                for wid, key in sorted(keys.items())
            ]
            if windows:
                await conn.execute(self._set_spent, windows)
        await conn.execute(
            self._charge_reservation,
            {
                "rid": row.id,
                "charged": int(row.charged_micros) + posted.charged,
                "usage_json": usage.as_json(),
            },
        )
        await conn.execute(
            self._insert_entry,
            {
                "user_id": user,
                "kind": "charge",
                "amount_micros": -posted.charged,
                "reservation_id": row.id,
                "hold_id": row.id,
                "price_id": row.price_id,
                "idempotency_key": None,
                "actor": "",
                "reason": "",
                "flags": ",".join(flags),
                "created_at": now,
                "written_off_micros": posted.written_off,
            },
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
