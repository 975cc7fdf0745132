"""The channel catalog: the upstream endpoints relays may send requests to, and its revision.

Every change to a channel bumps the single ``catalog_revision`` row in the same transaction, so a
relay polling ``list_channels(known_revision)`` learns "nothing changed" from one primary-key read and
downloads the channel list only after a change.

Credentials (the API key, secret-looking header values) are write-only through the admin API, which
shows them masked (:mod:`services.common.credentials`). A channel sent back with a credential still
masked, as listed, keeps the stored value, so editing a listed channel never needs the secret again.
"""

from __future__ import annotations

import dataclasses
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from services.common import credentials
from services.common.clock import Clock
from services.common.db import Database
from services.common.errors import Conflict, InvalidRequest
from services.common.ids import new_id
from services.quota import models

__all__ = ["Catalog", "Channel", "ChannelList", "validate_channel"]

DEFAULT_CONNECT_MS = 5_000
DEFAULT_FIRST_BYTE_MS = 60_000
DEFAULT_TOTAL_MS = 600_000
DEFAULT_MAX_CONNECTIONS = 200
MAX_WEIGHT = 1_000_000
_REVISION_ROW = 1


@dataclass(frozen=True, slots=True)
class Channel:
    """An upstream endpoint. On upsert, an empty ``channel_id`` creates a new channel and a 0 timeout
    or connection limit means the default."""

    channel_id: str = ""
    name: str = ""
    # OpenAI-compatible base URL, including /v1.
    base_url: str = ""
    api_key: str = ""
    models: tuple[str, ...] = ()
    # Public model name -> the provider's model name.
    model_map: Mapping[str, str] = field(default_factory=dict)
    priority: int = 0
    weight: int = 1
    headers: Mapping[str, str] = field(default_factory=dict)
    connect_timeout_ms: int = 0
    first_byte_timeout_ms: int = 0
    total_timeout_ms: int = 0
    max_connections: int = 0
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class ChannelList:
    revision: int
    # True when the caller already has this revision; ``channels`` is then empty.
    unchanged: bool
    channels: tuple[Channel, ...] = ()


def _invalid(message: str, param: str) -> InvalidRequest:
    return InvalidRequest(message, param=param)


def _text(name: str, value: str, max_len: int, *, required: bool) -> str:
    value = value.strip()
    if required and not value:
        raise _invalid(f"{name} is required", name)
    if len(value) > max_len:
        raise _invalid(f"{name} is longer than {max_len} characters", name)
    return value


def _or_default(name: str, value: int, default: int) -> int:
    if value < 0:
        raise _invalid(f"{name} must not be negative (got {value})", name)
    return value or default


def _no_line_breaks(name: str, pairs: Mapping[str, str]) -> dict[str, str]:
    for key, value in pairs.items():
        if not key.strip():
            raise _invalid(f"{name} has an empty key", name)
        # A CR or LF would let a stored header inject extra headers into every upstream request.
        if any(c in key + value for c in "\r\n\0"):
            raise _invalid(f"{name}[{key!r}] contains a line break", name)
    return dict(pairs)


def _no_credentials_in_url(parts: urllib.parse.SplitResult) -> None:
    """Credentials belong in ``api_key`` or a header, which are never shown; a URL is shown as is."""
    secret_query = [
        name
        for name, _ in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        if credentials.is_secret_header(name)
    ]
    if parts.password is not None or secret_query:
        raise _invalid(
            "base_url must not carry credentials (user:password@ or a key in the query): "
            "put them in api_key or headers, which are stored write-only",
            "base_url",
        )


def restore_credentials(channel: Channel, stored: Channel | None) -> Channel:
    """``channel`` with every credential sent back masked replaced by the stored value it masks.

    Raises InvalidRequest for a masked value that is not the mask of this channel's stored one.
    """
    api_key = credentials.unmask(channel.api_key, stored.api_key if stored else "")
    if api_key is None:
        raise _invalid("api_key is masked but not this channel's: send the real key", "api_key")
    headers: dict[str, str] = {}
    for name, value in channel.headers.items():
        kept = credentials.unmask(value, stored.headers.get(name, "") if stored else "")
        if kept is None:
            raise _invalid(
                f"headers[{name!r}] is masked but not this channel's: send the real value", "headers"
            )
        headers[name] = kept
    return dataclasses.replace(channel, api_key=api_key, headers=headers)


def validate_channel(channel: Channel) -> Channel:
    """Check a channel before it is stored; returns it normalized (defaults filled in, models deduped)."""
    channel_id = _text("channel_id", channel.channel_id, 40, required=False)
    base_url = _text("base_url", channel.base_url, 500, required=True)
    parts = urllib.parse.urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in base_url):
        raise _invalid(f"base_url must be an http(s):// URL with a host (got {base_url!r})", "base_url")
    _no_credentials_in_url(parts)
    models_: list[str] = []
    for model in channel.models:
        name = _text("models", model, 200, required=True)
        if name not in models_:
            models_.append(name)
    # proto3 cannot tell an omitted weight from 0, so 0 means the default like every other number here;
    # "never pick this channel" is what `enabled` is for.
    weight = _or_default("weight", channel.weight, 1)
    if weight > MAX_WEIGHT:
        raise _invalid(f"weight must be between 1 and {MAX_WEIGHT} (got {weight})", "weight")
    max_connections = _or_default("max_connections", channel.max_connections, DEFAULT_MAX_CONNECTIONS)
    connect = _or_default("connect_timeout_ms", channel.connect_timeout_ms, DEFAULT_CONNECT_MS)
    first_byte = _or_default("first_byte_timeout_ms", channel.first_byte_timeout_ms, DEFAULT_FIRST_BYTE_MS)
    total = _or_default("total_timeout_ms", channel.total_timeout_ms, DEFAULT_TOTAL_MS)
    if first_byte > total or connect > total:
        raise _invalid(
            "total_timeout_ms must not be shorter than the connect or first-byte timeout", "total_timeout_ms"
        )
    return Channel(
        channel_id=channel_id,
        name=_text("name", channel.name, 200, required=True),
        base_url=base_url.rstrip("/"),
        api_key=_text("api_key", channel.api_key, 500, required=False),
        models=tuple(models_),
        model_map=_no_line_breaks("model_map", channel.model_map),
        priority=channel.priority,
        weight=weight,
        headers=_no_line_breaks("headers", channel.headers),
        connect_timeout_ms=connect,
        first_byte_timeout_ms=first_byte,
        total_timeout_ms=total,
        max_connections=max_connections,
        enabled=channel.enabled,
    )


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
            raise _invalid("channel_id is required", "channel_id")
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
