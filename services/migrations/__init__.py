"""The one schema history of relaygate (Alembic), covering every service's tables.

Each service owns a branch of the history (``branch_labels``: auth, quota, logger) rooted at the
shared initial revision, so services evolve their tables independently; upgrading goes to every
head. ``python -m services.migrations`` (or ``relaygate migrate``) upgrades the database named by
``RELAYGATE_DATABASE_URL`` to the newest revision. Deployments run it once per release (a Kubernetes
Job) before the services roll out; services never migrate on start.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from services.common.config import normalize_database_url

SCRIPT_LOCATION = Path(__file__).parent


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    config.attributes["connection"] = connection
    return config


async def upgrade(database_url: str, revision: str = "heads") -> None:
    engine = create_async_engine(normalize_database_url(database_url))
    try:
        async with engine.begin() as conn:
            await conn.run_sync(lambda sync_conn: command.upgrade(alembic_config(sync_conn), revision))
    finally:
        await engine.dispose()
