"""The statements that lock the books, shared by both of quota's ledger transactions.

Posting (exact reservations, :mod:`services.quota.posting`) and leasing (:mod:`services.quota.leasing`)
change the same accounts and budget windows from different processes. Both take their locks in one
order, holds < accounts < budget windows, each set in one statement sorted by its key, so no two
transactions can wait on each other in a cycle. The statements that encode that order live here once.
"""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import (
    ARRAY,
    BigInteger,
    ColumnElement,
    String,
    any_,
    bindparam,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite

from services.quota.budgets import WindowKey
from services.quota.models import ACCOUNTS, BUDGETS, ENTRIES, RESERVATION, RESERVATIONS, USAGE

__all__ = ["BookLocks", "member_of", "window_row"]

_A = ACCOUNTS.c
_B = BUDGETS.c
_L = ENTRIES.c
_R = RESERVATIONS.c
_U = USAGE.c


def member_of(column: Any, name: str, *, postgres: bool, integer: bool = False) -> ColumnElement[bool]:
    """``column`` is one of the list bound as ``name``. On PostgreSQL an array parameter keeps the SQL
    text (and its prepared statement) the same whatever the list's length."""
    if postgres:
        element_type = BigInteger() if integer else String()
        return cast(ColumnElement[bool], column == any_(bindparam(name, type_=ARRAY(element_type))))
    return cast(ColumnElement[bool], column.in_(bindparam(name, expanding=True)))


def window_row(key: WindowKey, now_s: int) -> dict[str, Any]:
    """A budget window that holds and has spent nothing yet (inserted before it is locked)."""
    return {
        "scope": key.scope,
        "scope_id": key.scope_id,
        "period": key.period,
        "window_start": key.window_start,
        "spent_micros": 0,
        "reserved_micros": 0,
        "limit_micros": 0,
        "updated_at": now_s,
    }


class BookLocks:
    """Exact reservations (bound as ``ids``), operator budgets (``sids``), accounts (``users``) and
    budget windows (``sids`` and ``starts``), read and locked in the shared order; one set per
    database dialect."""

    def __init__(self, *, postgres: bool) -> None:
        # With the charge already written for each (its entry id and flags), so a repeated settle or
        # a late event finds it under the lock. A lease is finished by its relay's sync or by quota,
        # never through these.
        self.lock_reservations = (
            select(
                _R.id,
                _R.user_id,
                _R.key_id,
                _R.model,
                _R.state,
                _R.price_id,
                _R.reserved_micros,
                _R.charged_micros,
                _R.expires_at,
                _R.budget_windows,
                _R.day_start,
                _R.month_start,
                _R.leases,
                _L.id.label("entry_id"),
                _L.flags,
            )
            .select_from(RESERVATIONS.outerjoin(ENTRIES, _L.reservation_id == _R.id))
            .where(member_of(_R.id, "ids", postgres=postgres), _R.kind == RESERVATION)
            .order_by(_R.id)
            .with_for_update(of=RESERVATIONS)
        )
        self.stored_budgets = select(_B.scope, _B.scope_id, _B.period, _B.limit_micros).where(
            member_of(_B.scope_id, "sids", postgres=postgres)
        )
        self.accounts = select(_A.user_id, _A.balance_micros, _A.reserved_micros).where(
            member_of(_A.user_id, "users", postgres=postgres)
        )
        self.lock_accounts = self.accounts.order_by(_A.user_id).with_for_update()
        self.new_windows = (postgresql.insert if postgres else sqlite.insert)(USAGE).on_conflict_do_nothing(
            index_elements=["scope", "scope_id", "period", "window_start"]
        )
        self.lock_windows = (
            select(
                _U.scope,
                _U.scope_id,
                _U.period,
                _U.window_start,
                _U.spent_micros,
                _U.reserved_micros,
                _U.limit_micros,
            )
            .where(
                member_of(_U.scope_id, "sids", postgres=postgres),
                member_of(_U.window_start, "starts", postgres=postgres, integer=True),
            )
            .order_by(_U.scope, _U.scope_id, _U.period, _U.window_start)
            .with_for_update()
        )
