"""The channel catalog: CRUD, validation, and the revision relays poll."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import TypedDict

import pytest

from services.catalog.channel import Channel
from services.catalog.store import Catalog
from services.common.db import Database
from services.common.errors import InvalidRequest

OPENAI = Channel(
    name="openai-main",
    base_url="https://api.example.com/v1/",
    api_key="sk-test",
    models=("gpt-4o", "gpt-4o-mini", "gpt-4o"),
    model_map={"gpt-4o": "gpt-4o-2024-08-06"},
    priority=10,
    weight=3,
    headers={"OpenAI-Organization": "org-1"},
)


class ChannelChanges(TypedDict, total=False):
    """Fields a test sets on :data:`OPENAI` to make it invalid."""

    name: str
    base_url: str
    models: tuple[str, ...]
    weight: int
    headers: dict[str, str]
    connect_timeout_ms: int
    first_byte_timeout_ms: int
    total_timeout_ms: int
    type: str
    api_version: str


async def _replica_caught_up(db: Database) -> None:
    assert await db.wait_replica_caught_up(await db.primary_lsn() or 0, timeout=5)


async def test_upsert_assigns_an_id_fills_defaults_and_bumps_the_revision(
    catalog: Catalog, database: Database
) -> None:
    before = await catalog.revision(consistent=True)

    created = await catalog.upsert_channel(OPENAI)

    assert created.channel_id.startswith("ch_")
    assert created.base_url == "https://api.example.com/v1"
    assert created.models == ("gpt-4o", "gpt-4o-mini")
    assert (created.connect_timeout_ms, created.total_timeout_ms, created.max_connections) == (
        5_000,
        600_000,
        200,
    )
    assert await catalog.revision(consistent=True) == before + 1
    await _replica_caught_up(database)
    listing = await catalog.list_channels(0)
    assert listing.revision == before + 1
    assert not listing.unchanged
    assert created in listing.channels


async def test_polling_with_the_current_revision_is_unchanged_until_a_change(
    catalog: Catalog, database: Database
) -> None:
    channel = await catalog.upsert_channel(OPENAI)
    await _replica_caught_up(database)
    known = (await catalog.list_channels(0)).revision

    polled = await catalog.list_channels(known)
    assert (polled.unchanged, polled.channels, polled.revision) == (True, (), known)

    updated = await catalog.upsert_channel(dataclasses.replace(channel, weight=7, enabled=False))
    await _replica_caught_up(database)
    changed = await catalog.list_channels(known)
    assert not changed.unchanged
    assert changed.revision == known + 1
    assert updated in changed.channels
    assert [c.weight for c in changed.channels if c.channel_id == channel.channel_id] == [7]

    assert await catalog.delete_channel(channel.channel_id) is True
    assert await catalog.delete_channel(channel.channel_id) is False
    await _replica_caught_up(database)
    after_delete = await catalog.list_channels(known + 1)
    assert after_delete.revision == known + 2, "a failed delete does not bump the revision"
    assert channel.channel_id not in {c.channel_id for c in after_delete.channels}


async def test_concurrent_changes_each_bump_the_revision_once(catalog: Catalog) -> None:
    before = await catalog.revision(consistent=True)

    await asyncio.gather(
        *(catalog.upsert_channel(dataclasses.replace(OPENAI, name=f"c{i}")) for i in range(10))
    )

    assert await catalog.revision(consistent=True) == before + 10


async def test_upsert_with_an_explicit_id_creates_then_replaces(catalog: Catalog) -> None:
    first = await catalog.upsert_channel(dataclasses.replace(OPENAI, channel_id="ch_fixed"))
    second = await catalog.upsert_channel(dataclasses.replace(OPENAI, channel_id="ch_fixed", name="renamed"))

    listing = await catalog.list_channels(0, consistent=True)
    assert first.channel_id == second.channel_id == "ch_fixed"
    assert [c.name for c in listing.channels if c.channel_id == "ch_fixed"] == ["renamed"]


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"base_url": "ftp://files.example.com"}, id="not http"),
        pytest.param({"base_url": "https://"}, id="no host"),
        pytest.param({"base_url": "https://exa mple.com"}, id="whitespace"),
        pytest.param({"name": " "}, id="no name"),
        pytest.param({"weight": -1}, id="negative weight"),
        pytest.param({"weight": 1_000_001}, id="weight too large"),
        pytest.param({"connect_timeout_ms": -1}, id="negative timeout"),
        pytest.param({"first_byte_timeout_ms": 10_000, "total_timeout_ms": 5_000}, id="total < first byte"),
        pytest.param({"headers": {"X-Evil": "a\r\nHost: other"}}, id="header injection"),
        pytest.param({"models": ("",)}, id="empty model name"),
        pytest.param({"type": "cohere"}, id="unknown channel type"),
        pytest.param({"type": "azure-openai"}, id="azure without api_version"),
        pytest.param({"api_version": "2024-10-21"}, id="api_version on an openai channel"),
        pytest.param({"type": "azure-openai", "api_version": "2024&x=1"}, id="api_version with a query"),
    ],
)
async def test_invalid_channels_are_refused(catalog: Catalog, changes: ChannelChanges) -> None:
    before = await catalog.revision(consistent=True)

    with pytest.raises(InvalidRequest):
        await catalog.upsert_channel(dataclasses.replace(OPENAI, **changes))

    assert await catalog.revision(consistent=True) == before


async def test_a_channel_keeps_its_type_and_api_version(catalog: Catalog) -> None:
    created = await catalog.upsert_channel(OPENAI)
    assert created.type == "openai"  # the default: OpenAI-compatible, sent as is

    azure = dataclasses.replace(
        OPENAI, base_url="https://res.openai.azure.com", type="azure-openai", api_version="2024-10-21"
    )
    stored = await catalog.upsert_channel(azure)
    listed = {c.channel_id: c for c in (await catalog.list_channels(0, consistent=True)).channels}
    assert (listed[stored.channel_id].type, listed[stored.channel_id].api_version) == (
        "azure-openai",
        "2024-10-21",
    )
    anthropic = await catalog.upsert_channel(dataclasses.replace(OPENAI, type=" anthropic "))
    assert anthropic.type == "anthropic"
