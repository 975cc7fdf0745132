"""Alembic environment: runs on the connection handed over by :func:`services.migrations.upgrade`."""

from __future__ import annotations

from alembic import context

import services.auth.models
import services.catalog.models
import services.logger.models
import services.quota.models  # noqa: F401  (registers the tables on Base.metadata)
from services.common.db import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through services.migrations.upgrade() or `relaygate migrate`")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
