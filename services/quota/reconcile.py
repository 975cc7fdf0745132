"""Reconciliation: prove that the stored totals are what the ledger and the reservations add up to.

Four checks, each a discrepancy ``kind``:

* ``balance`` - per user, ``balance == sum(ledger entries)`` and ``reserved == sum(held reservations)``
  (entries of a user without an account must sum to zero: only free requests do that);
* ``charge`` - every settled reservation has exactly one charge entry of exactly its charge, a held
  one has none, and a released or expired one has at most one (its late charge) of exactly its
  charge; the charge entries of a lease (one per request) sum to exactly its ``charged_micros``, in
  whatever state;
* ``budget`` - every budget window's ``spent`` and ``reserved`` equal the charges and holds of the
  reservations and leases counted in it;
* ``write_off`` - what a charge wrote off is never negative and only a late charge writes anything
  off (a charge on time is covered by its hold), so every write-off is a cost on the books that the
  balance never paid, and nothing else is.

Reading a replica is fine: its snapshot is an older commit, and the invariants hold at every commit.
``python -m services.quota reconcile`` prints the discrepancies and exits non-zero when there are any.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import case, func, literal, select, union_all

from services.common.db import Database
from services.quota import models
from services.quota.budgets import PERIODS, SCOPES, window_bit
from services.quota.models import ACCOUNTS, ENTRIES, RESERVATIONS, USAGE
from services.quota.settlement import FLAG_LATE

__all__ = ["Discrepancy", "reconcile"]

_A = ACCOUNTS.c
_R = RESERVATIONS.c
_L = ENTRIES.c
_U = USAGE.c


@dataclass(frozen=True, slots=True)
class Discrepancy:
    """One thing the books disagree on: what is stored against what it should be."""

    # balance | charge | budget | write_off
    kind: str
    # The user id, the reservation id, "<scope>:<scope_id>:<period>:<window_start>", or the ledger
    # entry id.
    subject: str
    stored_micros: int
    expected_micros: int
    # balance, budget: what is held; charge: how many charge entries there are and should be;
    # write_off: stored is the write-off, expected what it may be (0 unless the charge is late).
    stored_reserved_micros: int = 0
    expected_reserved_micros: int = 0

    def describe(self) -> str:
        if self.kind == "write_off":
            return (
                f"write_off entry {self.subject}: writes off {self.stored_micros}, "
                f"{self.expected_micros} expected (only a late charge writes anything off)"
            )
        if self.kind == "charge":
            return (
                f"charge {self.subject}: the ledger charges {self.stored_micros} in "
                f"{self.stored_reserved_micros} entries, the reservation {self.expected_micros} in "
                f"{self.expected_reserved_micros}"
            )
        noun = "balance" if self.kind == "balance" else "spent"
        return (
            f"{self.kind} {self.subject}: {noun} {self.stored_micros} vs {self.expected_micros} expected, "
            f"held {self.stored_reserved_micros} vs {self.expected_reserved_micros} expected"
        )


def _balances() -> object:
    sums = (
        select(_L.user_id.label("user_id"), func.sum(_L.amount_micros).label("total"))
        .group_by(_L.user_id)
        .subquery()
    )
    held = (
        select(_R.user_id.label("user_id"), func.sum(_R.reserved_micros).label("total"))
        .where(_R.state == models.HELD)
        .group_by(_R.user_id)
        .subquery()
    )
    ledger_total = func.coalesce(sums.c.total, 0)
    held_total = func.coalesce(held.c.total, 0)
    accounts = (
        select(_A.user_id, _A.balance_micros, ledger_total, _A.reserved_micros, held_total)
        .outerjoin(sums, sums.c.user_id == _A.user_id)
        .outerjoin(held, held.c.user_id == _A.user_id)
        .where((_A.balance_micros != ledger_total) | (_A.reserved_micros != held_total))
    )
    orphans = (
        select(sums.c.user_id, literal(0), sums.c.total, literal(0), literal(0))
        .outerjoin(ACCOUNTS, _A.user_id == sums.c.user_id)
        .where(_A.user_id.is_(None), sums.c.total != 0)
    )
    return accounts.union_all(orphans)


def _charges() -> object:
    # Charges name their hold: a reservation's own id, or the lease a request was admitted on.
    entries = (
        select(
            _L.hold_id.label("hid"),
            func.sum(_L.amount_micros).label("total"),
            func.count(_L.id).label("n"),
        )
        .where(_L.hold_id.is_not(None))
        .group_by(_L.hold_id)
        .subquery()
    )
    count = func.coalesce(entries.c.n, 0)
    total = func.coalesce(entries.c.total, 0)
    lease = _R.kind == models.LEASE
    # How many entries an exact reservation has: settled, its charge; held, none; released or
    # expired, none or its late charge.
    least = case((_R.state == models.SETTLED, 1), else_=0)
    most = case((_R.state == models.HELD, 0), else_=1)
    exact_wrong = (count < least) | (count > most) | (total != -_R.charged_micros)
    return (
        select(_R.id, total, _R.charged_micros, count, least, most, lease)
        .outerjoin(entries, entries.c.hid == _R.id)
        .where(case((lease, total != -_R.charged_micros), else_=exact_wrong))
    )


def _write_offs() -> object:
    late = (literal(",") + _L.flags + literal(",")).like(f"%,{FLAG_LATE},%")
    return select(_L.id, _L.written_off_micros).where(
        (_L.written_off_micros < 0) | ((_L.written_off_micros != 0) & ((_L.kind != "charge") | ~late))
    )


def _window_sums() -> object:
    parts = []
    for scope in SCOPES:
        for period in PERIODS:
            parts.append(
                select(
                    literal(scope).label("scope"),
                    (_R.key_id if scope == "key" else _R.user_id).label("scope_id"),
                    literal(period).label("period"),
                    (_R.day_start if period == "day" else _R.month_start).label("window_start"),
                    # A lease's charges are spent as they arrive; a reservation's when it finishes
                    # (settled, or charged late after its expiry or release).
                    case(
                        (_R.kind == models.LEASE, _R.charged_micros),
                        (_R.state == models.HELD, 0),
                        else_=_R.charged_micros,
                    ).label("spent"),
                    case((_R.state == models.HELD, _R.reserved_micros), else_=0).label("held"),
                ).where(_R.budget_windows.op("&")(window_bit(scope, period)) != 0)
            )
    counted = union_all(*parts).subquery()
    return select(
        counted.c.scope,
        counted.c.scope_id,
        counted.c.period,
        counted.c.window_start,
        func.sum(counted.c.spent),
        func.sum(counted.c.held),
    ).group_by(counted.c.scope, counted.c.scope_id, counted.c.period, counted.c.window_start)


async def reconcile(db: Database, *, consistent: bool = False) -> list[Discrepancy]:
    """Every discrepancy in the books, sorted by kind and subject; empty when everything agrees."""
    found: list[Discrepancy] = []
    async with db.reader(consistent=consistent) as session:
        conn = await session.connection()
        # One snapshot for all checks: a concurrent settle must not be half-seen across queries.
        if db.dialect == "postgresql":
            await conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        for r in await conn.execute(_balances()):  # type: ignore[call-overload]
            found.append(Discrepancy("balance", str(r[0]), int(r[1]), int(r[2]), int(r[3]), int(r[4])))
        for r in await conn.execute(_charges()):  # type: ignore[call-overload]
            count = int(r[3])
            # A lease has one entry per request charged: only the sum is checked.
            entries = count if r[6] else min(max(count, int(r[4])), int(r[5]))
            found.append(Discrepancy("charge", str(r[0]), -int(r[1]), int(r[2]), count, entries))
        for r in await conn.execute(_write_offs()):  # type: ignore[call-overload]
            found.append(Discrepancy("write_off", str(r[0]), int(r[1]), 0))
        stored = {
            (str(r[0]), str(r[1]), str(r[2]), int(r[3])): (int(r[4]), int(r[5]))
            for r in await conn.execute(
                select(_U.scope, _U.scope_id, _U.period, _U.window_start, _U.spent_micros, _U.reserved_micros)
            )
        }
        expected = {
            (str(r[0]), str(r[1]), str(r[2]), int(r[3])): (int(r[4] or 0), int(r[5] or 0))
            for r in await conn.execute(_window_sums())  # type: ignore[call-overload]
        }
    for key in sorted(stored.keys() | expected.keys()):
        have, want = stored.get(key, (0, 0)), expected.get(key, (0, 0))
        if have != want:
            found.append(Discrepancy("budget", ":".join(map(str, key)), have[0], want[0], have[1], want[1]))
    return sorted(found, key=lambda d: (d.kind, d.subject))
