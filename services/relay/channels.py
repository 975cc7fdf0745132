"""The channel table: which upstreams serve which model, refreshed from quota's catalog.

Selection is by priority (highest first), then weighted-random order within a priority, so load
spreads by weight and failover walks down to lower priorities. The table is replaced as a whole on
each change, so a request always sees one consistent version.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.common.errors import GatewayError
from services.common.grpc import call
from services.common.pb.relaygate.quota.v1.quota_pb2 import Channel as ChannelMessage
from services.common.pb.relaygate.quota.v1.quota_pb2 import ListChannelsRequest

if TYPE_CHECKING:
    from services.common.pb.relaygate.quota.v1.quota_pb2_grpc import QuotaServiceAsyncStub

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Channel:
    id: str
    name: str
    base_url: str
    api_key: str
    models: tuple[str, ...]
    model_map: dict[str, str]
    priority: int
    weight: int
    headers: dict[str, str]
    connect_timeout_s: float
    first_byte_timeout_s: float
    total_timeout_s: float
    max_connections: int

    @classmethod
    def from_message(cls, m: ChannelMessage) -> Channel:
        return cls(
            id=m.channel_id,
            name=m.name,
            base_url=m.base_url.rstrip("/"),
            api_key=m.api_key,
            models=tuple(m.models),
            model_map=dict(m.model_map),
            priority=m.priority,
            weight=max(1, m.weight),
            headers=dict(m.headers),
            connect_timeout_s=(m.connect_timeout_ms or 5_000) / 1000,
            first_byte_timeout_s=(m.first_byte_timeout_ms or 60_000) / 1000,
            total_timeout_s=(m.total_timeout_ms or 600_000) / 1000,
            max_connections=m.max_connections or 200,
        )

    def upstream_model(self, model: str) -> str:
        return self.model_map.get(model, model)


class ChannelTable:
    def __init__(self, channels: list[Channel] | None = None, revision: int = 0) -> None:
        self.revision = revision
        self.channels = channels or []
        by_model: dict[str, list[Channel]] = defaultdict(list)
        for channel in self.channels:
            for model in channel.models:
                by_model[model].append(channel)
        self._by_model = dict(by_model)

    @property
    def models(self) -> list[str]:
        return sorted(self._by_model)

    def candidates(self, model: str) -> list[Channel]:
        """Channels for ``model`` in the order to try them (empty when nobody serves it)."""
        channels = self._by_model.get(model)
        if not channels:
            return []
        if len(channels) == 1:
            return list(channels)
        ordered: list[Channel] = []
        for priority in sorted({c.priority for c in channels}, reverse=True):
            group = [c for c in channels if c.priority == priority]
            # Weighted random order without replacement (Efraimidis-Spirakis keys).
            group.sort(key=lambda c: random.random() ** (1.0 / c.weight), reverse=True)
            ordered.extend(group)
        return ordered


class ChannelDirectory:
    """Keeps a :class:`ChannelTable` current by polling quota's catalog revision."""

    def __init__(self, stub: QuotaServiceAsyncStub, *, refresh_s: float, rpc_timeout_s: float) -> None:
        self._stub = stub
        self._refresh_s = refresh_s
        self._timeout = rpc_timeout_s
        self.table = ChannelTable()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        try:
            await self.refresh()
        except GatewayError:
            log.warning("channel catalog unavailable at startup; retrying in the background")
        self._task = asyncio.create_task(self._poll(), name="channel-refresh")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def refresh(self, *, consistent: bool = False) -> None:
        """Load the catalog if it changed; ``consistent`` reads it from the primary (after an edit)."""
        listing = await call(
            self._stub.ListChannels,
            ListChannelsRequest(known_revision=self.table.revision, consistent=consistent),
            timeout=self._timeout,
        )
        if listing.unchanged:
            return
        channels = [Channel.from_message(m) for m in listing.channels if m.enabled]
        self.table = ChannelTable(channels, listing.revision)
        log.info("channel table updated", extra={"revision": listing.revision, "channels": len(channels)})

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            try:
                await self.refresh()
            except GatewayError as exc:
                log.warning("channel refresh failed: %s", exc.message)
