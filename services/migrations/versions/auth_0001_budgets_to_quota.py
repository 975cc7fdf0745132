"""auth: key and user budgets move to quota's ``budgets`` table; auth's limits keep rate and concurrency

A spending cap used to have two owners: the ``daily_budget_micros`` / ``monthly_budget_micros`` of a
key's or user's ``limits`` JSON (auth) and the ``budgets`` table (quota), the smaller one in force.
This revision writes each budget found in ``users.limits`` and ``api_keys.limits`` into ``budgets``
(scope ``user`` or ``key``, period ``day`` or ``month``), keeping the smaller cap where quota already
had one, so the cap in force for every key and user is unchanged, then removes the two names from
the JSON. Code of either version enforces the same caps afterwards: quota of this version reads only
the table, and the previous version's quota took the smaller of the (now equal or absent) two.

Downgrade writes the caps of ``budgets`` back into the limits of the keys and users that exist (the
table keeps them too: the previous version takes the smaller of two equal caps).

Revision ID: auth_0001
Revises: 0001
Depends on: quota_0001 (the ``budgets`` table)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "auth_0001"
down_revision = "0001"
branch_labels = ("auth",)
depends_on = ("quota_0001",)

_PERIODS = {"daily_budget_micros": "day", "monthly_budget_micros": "month"}
_OWNERS = {"user": "users", "key": "api_keys"}
_ACTOR = "migration auth_0001"
# The largest cap quota accepts (services.quota.budgets.MAX_BUDGET_MICROS).
_MAX_BUDGET_MICROS = 10**15
_BATCH = 1000

_budgets = sa.table(
    "budgets",
    sa.column("scope", sa.String),
    sa.column("scope_id", sa.String),
    sa.column("period", sa.String),
    sa.column("limit_micros", sa.BigInteger),
    sa.column("actor", sa.String),
    sa.column("updated_at", sa.BigInteger),
)


def _owner(name: str) -> sa.TableClause:
    return sa.table(name, sa.column("id", sa.String), sa.column("limits", sa.JSON))


def _with_budgets(conn: sa.Connection, table: sa.TableClause) -> Iterator[tuple[str, dict[str, Any]]]:
    """Rows whose limits name a budget, read in id order a page at a time (the text test is a
    prefilter both SQLite and PostgreSQL evaluate; the JSON is checked in Python)."""
    after = ""
    while True:
        page = conn.execute(
            sa.select(table.c.id, table.c.limits)
            .where(
                table.c.id > after,
                sa.cast(table.c.limits, sa.Text).like("%budget_micros%"),
            )
            .order_by(table.c.id)
            .limit(_BATCH)
        ).all()
        for row in page:
            limits = row.limits if isinstance(row.limits, dict) else {}
            if any(name in limits for name in _PERIODS):
                yield str(row.id), dict(limits)
        if len(page) < _BATCH:
            return
        after = str(page[-1].id)


def _cap(value: Any) -> int:
    try:
        return min(int(value), _MAX_BUDGET_MICROS)
    except (TypeError, ValueError):
        return 0


def upgrade() -> None:
    conn = op.get_bind()
    now = int(time.time())
    for scope, name in _OWNERS.items():
        table = _owner(name)
        for scope_id, limits in _with_budgets(conn, table):
            for field, period in _PERIODS.items():
                cap = _cap(limits.pop(field, 0))
                if cap <= 0:
                    continue
                where = sa.and_(
                    _budgets.c.scope == scope, _budgets.c.scope_id == scope_id, _budgets.c.period == period
                )
                stored = conn.execute(sa.select(_budgets.c.limit_micros).where(where)).scalar()
                if stored is None:
                    conn.execute(
                        _budgets.insert().values(
                            scope=scope,
                            scope_id=scope_id,
                            period=period,
                            limit_micros=cap,
                            actor=_ACTOR,
                            updated_at=now,
                        )
                    )
                elif cap < int(stored):
                    conn.execute(
                        _budgets.update().where(where).values(limit_micros=cap, actor=_ACTOR, updated_at=now)
                    )
            conn.execute(table.update().where(table.c.id == scope_id).values(limits=limits))


def downgrade() -> None:
    conn = op.get_bind()
    fields = {period: field for field, period in _PERIODS.items()}
    for scope, name in _OWNERS.items():
        table = _owner(name)
        caps: dict[str, dict[str, int]] = {}
        rows = conn.execute(
            sa.select(_budgets.c.scope_id, _budgets.c.period, _budgets.c.limit_micros).where(
                _budgets.c.scope == scope
            )
        )
        for scope_id, period, cap in rows:
            caps.setdefault(str(scope_id), {})[fields[str(period)]] = int(cap)
        for scope_id, found in caps.items():
            row = conn.execute(sa.select(table.c.limits).where(table.c.id == scope_id)).first()
            if row is None:
                continue  # a budget of a key or user that no longer exists
            limits = dict(row.limits) if isinstance(row.limits, dict) else {}
            limits.update(found)
            conn.execute(table.update().where(table.c.id == scope_id).values(limits=limits))
