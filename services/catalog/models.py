"""Tables owned by the catalog: the channels and the single revision row relays poll.

The table names predate the catalog's own package (they were quota's), so existing databases need no
migration.
"""

from __future__ import annotations

from sqlalchemy import JSON, Boolean, String
from sqlalchemy.orm import Mapped, mapped_column

from services.common.db import Base


class Channel(Base):
    """An upstream provider endpoint the relay may send requests to."""

    __tablename__ = "channels"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    base_url: Mapped[str] = mapped_column(String(500))
    api_key: Mapped[str] = mapped_column(String(500), default="")
    models: Mapped[list[str]] = mapped_column(JSON, default=list)
    model_map: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    priority: Mapped[int] = mapped_column(default=0)
    weight: Mapped[int] = mapped_column(default=1)
    headers: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    connect_timeout_ms: Mapped[int] = mapped_column(default=5_000)
    first_byte_timeout_ms: Mapped[int] = mapped_column(default=60_000)
    total_timeout_ms: Mapped[int] = mapped_column(default=600_000)
    max_connections: Mapped[int] = mapped_column(default=200)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    type: Mapped[str] = mapped_column(String(32), default="openai")
    api_version: Mapped[str] = mapped_column(String(64), default="")
    updated_at: Mapped[int]


class CatalogRevision(Base):
    """A single row bumped on every channel change, so relays can poll cheaply for changes."""

    __tablename__ = "catalog_revision"

    id: Mapped[int] = mapped_column(primary_key=True)
    revision: Mapped[int] = mapped_column(default=0)
