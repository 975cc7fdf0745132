"""The migration that gives budgets one owner: key and user budgets in auth's limits JSON move to quota's
``budgets`` table (the smaller cap where quota had one), on PostgreSQL and on the embedded SQLite."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from devinfra.backing import BackingServices
from services.common.config import normalize_database_url
from services.migrations import alembic_config, upgrade

_users = sa.table(
    "users",
    sa.column("id", sa.String),
    sa.column("name", sa.String),
    sa.column("email", sa.String),
    sa.column("admin", sa.Boolean),
    sa.column("limits", sa.JSON),
    sa.column("created_at", sa.BigInteger),
)
_keys = sa.table(
    "api_keys",
    sa.column("id", sa.String),
    sa.column("public_id", sa.String),
    sa.column("secret_hash", sa.LargeBinary),
    sa.column("user_id", sa.String),
    sa.column("name", sa.String),
    sa.column("allowed_models", sa.JSON),
    sa.column("allowed_cidrs", sa.JSON),
    sa.column("expires_at", sa.BigInteger),
    sa.column("enabled", sa.Boolean),
    sa.column("revoked_at", sa.BigInteger),
    sa.column("limits", sa.JSON),
    sa.column("metadata", sa.JSON),
    sa.column("created_at", sa.BigInteger),
    sa.column("last_used_at", sa.BigInteger),
)
_budgets = sa.table(
    "budgets",
    sa.column("scope", sa.String),
    sa.column("scope_id", sa.String),
    sa.column("period", sa.String),
    sa.column("limit_micros", sa.BigInteger),
    sa.column("actor", sa.String),
    sa.column("updated_at", sa.BigInteger),
)

USER_LIMITS = {
    "usr_both": {"rpm": 5, "daily_budget_micros": 7_000, "monthly_budget_micros": 90_000},
    "usr_rates": {"tpm": 9},
    "usr_zero": {"daily_budget_micros": 0, "max_concurrency": 2},
}
KEY_LIMITS = {
    # Quota had 5,000 a day: the smaller carried 3,000 was in force, and stays.
    "key_smaller": {"daily_budget_micros": 3_000},
    # Quota had 50,000 a month: it was in force, and stays.
    "key_larger": {"monthly_budget_micros": 80_000, "rpm": 1},
    "key_plain": {},
}
STORED = [
    ("key", "key_smaller", "day", 5_000),
    ("key", "key_larger", "month", 50_000),
    ("user", "usr_gone", "day", 1),
]


async def _seed(conn: AsyncConnection) -> None:
    for user_id, limits in USER_LIMITS.items():
        await conn.execute(
            _users.insert().values(
                id=user_id, name=user_id, email=None, admin=False, limits=limits, created_at=1
            )
        )
    for n, (key_id, limits) in enumerate(KEY_LIMITS.items()):
        await conn.execute(
            _keys.insert().values(
                id=key_id,
                public_id=f"pub{n}",
                secret_hash=bytes(32),
                user_id="usr_both",
                name=key_id,
                allowed_models=[],
                allowed_cidrs=[],
                expires_at=0,
                enabled=True,
                revoked_at=0,
                limits=limits,
                metadata={},
                created_at=1,
                last_used_at=0,
            )
        )
    for scope, scope_id, period, micros in STORED:
        await conn.execute(
            _budgets.insert().values(
                scope=scope, scope_id=scope_id, period=period, limit_micros=micros, actor="ops", updated_at=1
            )
        )


async def _state(conn: AsyncConnection) -> tuple[set[tuple[Any, ...]], dict[str, Any], dict[str, Any]]:
    budgets = {
        tuple(row)
        for row in await conn.execute(
            sa.select(_budgets.c.scope, _budgets.c.scope_id, _budgets.c.period, _budgets.c.limit_micros)
        )
    }
    users = {str(r.id): r.limits for r in await conn.execute(sa.select(_users.c.id, _users.c.limits))}
    keys = {str(r.id): r.limits for r in await conn.execute(sa.select(_keys.c.id, _keys.c.limits))}
    return budgets, users, keys


async def _check_migration(url: str) -> None:
    await upgrade(url, "quota_0001")
    engine = create_async_engine(normalize_database_url(url))
    try:
        async with engine.begin() as conn:
            await _seed(conn)
        await upgrade(url)
        async with engine.begin() as conn:
            budgets, users, keys = await _state(conn)
        assert budgets == {
            ("user", "usr_both", "day", 7_000),
            ("user", "usr_both", "month", 90_000),
            ("key", "key_smaller", "day", 3_000),
            ("key", "key_larger", "month", 50_000),
            ("user", "usr_gone", "day", 1),
        }
        assert users == {"usr_both": {"rpm": 5}, "usr_rates": {"tpm": 9}, "usr_zero": {"max_concurrency": 2}}
        assert keys == {"key_smaller": {}, "key_larger": {"rpm": 1}, "key_plain": {}}

        # Back before auth_0001 (auth_0002 first): the caps return to the limits (the table keeps them).
        async with engine.begin() as conn:
            await conn.run_sync(lambda sync: command.downgrade(alembic_config(sync), "auth@-2"))
            restored, users, keys = await _state(conn)
        assert restored == budgets
        assert users["usr_both"] == {"rpm": 5, "daily_budget_micros": 7_000, "monthly_budget_micros": 90_000}
        assert users["usr_rates"] == {"tpm": 9}
        assert keys["key_smaller"] == {"daily_budget_micros": 3_000}
        assert keys["key_larger"] == {"rpm": 1, "monthly_budget_micros": 50_000}
    finally:
        await engine.dispose()


async def test_budgets_move_to_quota_on_postgresql(backing: BackingServices) -> None:
    primary, _ = backing.create_database("t_auth_budget_migration")
    await _check_migration(primary)


async def test_budgets_move_to_quota_on_sqlite(tmp_path: Path) -> None:
    await _check_migration(f"sqlite:///{tmp_path / 'relaygate.db'}")
