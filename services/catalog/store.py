"""The channel catalog's store: channel CRUD and the revision relays poll.

Every change to a channel bumps the single ``catalog_revision`` row in the same transaction, so a
relay polling ``list_channels(known_revision)`` learns "nothing changed" from one primary-key read and
downloads the channel list only after a change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from services.catalog import models
from services.catalog.channel import Channel, restore_credentials, validate_channel
from services.common.clock import Clock
from services.common.db import Database
from services.common.errors import Conflict, InvalidRequest
from services.common.ids import new_id

__all__ = ["Catalog", "ChannelList"]

_REVISION_ROW = 1


@dataclass(frozen=True, slots=True)
class ChannelList:
    revision: int
    # True when the caller already has this revision; ``channels`` is then empty.
    unchanged: bool
    channels: tuple[Channel, ...] = ()


def _from_row(row: models.Channel) -> Channel:
    return Channel(
        channel_id=row.id,
        name=row.name,
        base_url=row.base_url,
        api_key=row.api_key,
        models=tuple(row.models),
        model_map=dict(row.model_map),
        priority=row.priority,
        weight=row.weight,
        headers=dict(row.headers),
        connect_timeout_ms=row.connect_timeout_ms,
        first_byte_timeout_ms=row.first_byte_timeout_ms,
        total_timeout_ms=row.total_timeout_ms,
        max_connections=row.max_connections,
        enabled=row.enabled,
        type=row.type,
        api_version=row.api_version,
    )


class Catalog:
    """Channel CRUD; every change bumps the catalog revision in the same transaction."""

    def __init__(self, db: Database, *, clock: Clock) -> None:
        self._db = db
        self._clock = clock

    async def upsert_channel(self, channel: Channel) -> Channel:
        """Create (empty ``channel_id``: a new ``ch_...`` id) or replace a channel; returns it as stored.

        Credentials sent back masked keep their stored values (see :func:`restore_credentials`)."""
        channel = validate_channel(channel)
        channel_id = channel.channel_id or new_id("ch")
        try:
            return await self._upsert(channel, channel_id)
        except IntegrityError:
            # Two admins created the same explicit id at once; the second attempt updates the first's row.
            return await self._upsert(channel, channel_id)

    async def _upsert(self, channel: Channel, channel_id: str) -> Channel:
        values: dict[str, Any] = {
            "name": channel.name,
            "base_url": channel.base_url,
            "api_key": channel.api_key,
            "models": list(channel.models),
            "model_map": dict(channel.model_map),
            "priority": channel.priority,
            "weight": channel.weight,
            "headers": dict(channel.headers),
            "connect_timeout_ms": channel.connect_timeout_ms,
            "first_byte_timeout_ms": channel.first_byte_timeout_ms,
            "total_timeout_ms": channel.total_timeout_ms,
            "max_connections": channel.max_connections,
            "enabled": channel.enabled,
            "type": channel.type,
            "api_version": channel.api_version,
            "updated_at": int(self._clock.time()),
        }
        async with self._db.transaction() as session:
            row = await session.get(models.Channel, channel_id)
            channel = restore_credentials(channel, _from_row(row) if row is not None else None)
            values["api_key"] = channel.api_key
            values["headers"] = dict(channel.headers)
            if row is None:
                session.add(models.Channel(id=channel_id, **values))
            else:
                for name, value in values.items():
                    setattr(row, name, value)
            await session.flush()
            await self._bump(session)
        return dataclasses.replace(channel, channel_id=channel_id)

    async def delete_channel(self, channel_id: str) -> bool:
        """Delete a channel; False (and no revision bump) when it does not exist."""
        if not channel_id:
            raise InvalidRequest("channel_id is required", param="channel_id")
        async with self._db.transaction() as session:
            result = await session.execute(
                delete(models.Channel)
                .where(models.Channel.id == channel_id)
                .execution_options(synchronize_session=False)
            )
            if getattr(result, "rowcount", 0) == 0:
                return False
            await self._bump(session)
        return True

    async def list_channels(self, known_revision: int = 0, *, consistent: bool = False) -> ChannelList:
        """All channels and the catalog revision; ``unchanged`` without channels when the caller is current.

        Reads a replica by default. Relays poll this every second, which must not load the primary,
        and a replica a few milliseconds behind only delays a channel change until the next poll:
        routing to a just-removed channel for that long costs one failed attempt and a retry, never
        money. The revision is read before the channels, so the list returned is never older than the
        revision reported and no change can be missed. A caller that is *ahead* of a lagging replica
        is told "unchanged" rather than rolled back to an older list.
        """
        async with self._db.reader(consistent=consistent) as session:
            revision = await self._revision(session)
            if known_revision > 0 and known_revision >= revision:
                return ChannelList(revision=known_revision, unchanged=True)
            rows = (await session.scalars(select(models.Channel).order_by(models.Channel.id))).all()
        return ChannelList(revision=revision, unchanged=False, channels=tuple(_from_row(r) for r in rows))

    async def revision(self, *, consistent: bool = False) -> int:
        async with self._db.reader(consistent=consistent) as session:
            return await self._revision(session)

    @staticmethod
    async def _revision(session: AsyncSession) -> int:
        value = await session.scalar(
            select(models.CatalogRevision.revision).where(models.CatalogRevision.id == _REVISION_ROW)
        )
        return int(value or 0)

    async def _bump(self, session: AsyncSession) -> int:
        """Increment the revision inside the caller's transaction, creating the row on first use."""
        bump = (
            update(models.CatalogRevision)
            .where(models.CatalogRevision.id == _REVISION_ROW)
            .values(revision=models.CatalogRevision.revision + 1)
            .returning(models.CatalogRevision.revision)
            .execution_options(synchronize_session=False)
        )
        revision = await session.scalar(bump)
        if revision is None:
            # Concurrent first bumps: one insert wins, the other does nothing, and both then increment.
            await session.execute(self._insert_revision_row())
            revision = await session.scalar(bump)
        if revision is None:
            raise Conflict("the catalog revision row could not be created; retry")
        return int(revision)

    def _insert_revision_row(self) -> Any:
        values = {"id": _REVISION_ROW, "revision": 0}
        if self._db.dialect == "postgresql":
            return postgresql.insert(models.CatalogRevision).values(values).on_conflict_do_nothing()
        return sqlite.insert(models.CatalogRevision).values(values).on_conflict_do_nothing()
