"""The channel table: which upstreams serve which model, refreshed from the channel catalog
(``relaygate.catalog.v1.CatalogService``).

Selection is by priority (highest first), then weighted-random order within a priority, so load
spreads by weight and failover walks down to lower priorities. Each channel appears at most once in a
request's candidate list, and disabled channels are not in the table at all (an operator's "disabled"
is never overridden by the relay). The table is replaced as a whole on each change, so a request always
sees one consistent version; whoever needs to follow changes (the pools, the breakers) subscribes with
``on_change``.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx

from services.common.errors import GatewayError
from services.common.grpc import call
from services.common.pb.relaygate.catalog.v1.catalog_pb2 import Channel as ChannelMessage
from services.common.pb.relaygate.catalog.v1.catalog_pb2 import ListChannelsRequest
from services.common.tasks import cancel_and_wait
from services.relay.providers import Provider, provider_for

if TYPE_CHECKING:
    from services.common.pb.relaygate.catalog.v1.catalog_pb2_grpc import CatalogServiceAsyncStub

log = logging.getLogger(__name__)

Timeouts = dict[str, float | None]


@dataclass(frozen=True, slots=True)
class Channel:
    """One upstream as the relay uses it; the per-request pieces (target, headers, timeouts) are
    computed once here rather than on every request."""

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
    # The base URL's path (b"/v1"), to which the endpoint's own path is appended.
    path_prefix: bytes
    # Headers of every request to this channel, Host included (the caller's are never forwarded).
    raw_headers: tuple[tuple[bytes, bytes], ...]
    # The channel type's adapter; None for "openai" channels, whose traffic passes through unchanged.
    provider: Provider | None = None
    api_version: str = ""

    @classmethod
    def from_message(cls, m: ChannelMessage) -> Channel:
        base_url = m.base_url.rstrip("/")
        url = httpx.URL(base_url)
        provider = provider_for(m.type)
        headers = {"content-type": "application/json", "accept-encoding": "identity"}
        if provider is not None:
            headers.update(provider.auth_headers(m.api_key))
        elif m.api_key:
            headers["authorization"] = f"Bearer {m.api_key}"
        headers.update({name.lower(): value for name, value in m.headers.items()})
        headers.pop("host", None)
        host = url.raw_host + (b":%d" % url.port if url.port else b"")
        return cls(
            id=m.channel_id,
            name=m.name,
            base_url=base_url,
            api_key=m.api_key,
            models=tuple(dict.fromkeys(m.models)),
            model_map=dict(m.model_map),
            priority=m.priority,
            weight=max(1, m.weight),
            headers=dict(m.headers),
            connect_timeout_s=(m.connect_timeout_ms or 5_000) / 1000,
            first_byte_timeout_s=(m.first_byte_timeout_ms or 60_000) / 1000,
            total_timeout_s=(m.total_timeout_ms or 600_000) / 1000,
            max_connections=m.max_connections or 200,
            path_prefix=url.raw_path.rstrip(b"/"),
            raw_headers=((b"host", host), *((k.encode(), v.encode()) for k, v in headers.items())),
            provider=provider,
            api_version=m.api_version,
        )

    def target(self, path: bytes, model: str, *, stream: bool) -> bytes:
        """The request target for the OpenAI endpoint ``path`` and the public ``model``."""
        provider = self.provider
        if provider is None:
            return self.path_prefix + path
        return provider.target(
            self.path_prefix, path, self.upstream_model(model), stream=stream, api_version=self.api_version
        )

    def serves(self, path: bytes) -> bool:
        """Whether this channel's type can serve the OpenAI endpoint ``path``."""
        return self.provider is None or self.provider.serves(path)

    def upstream_model(self, model: str) -> str:
        return self.model_map.get(model, model)

    def timeouts(self) -> Timeouts:
        """httpcore's timeout extension for one attempt: ``read`` is the first-byte timeout (a stream
        lowers it to its idle timeout once the headers are in); waiting for a pooled connection is
        bounded like connecting."""
        connect = self.connect_timeout_s
        return {"connect": connect, "read": self.first_byte_timeout_s, "write": connect, "pool": connect}


class ChannelTable:
    def __init__(self, channels: list[Channel] | None = None, revision: int = 0) -> None:
        self.revision = revision
        self.channels = channels or []
        by_model: dict[str, dict[str, Channel]] = {}
        for channel in self.channels:
            for model in channel.models:
                # Keyed by id: a channel listed twice (or a model listed twice) is still one candidate.
                by_model.setdefault(model, {})[channel.id] = channel
        self._by_model = {model: list(found.values()) for model, found in by_model.items()}
        self._single = {model: found for model, found in self._by_model.items() if len(found) == 1}

    @property
    def loaded(self) -> bool:
        """The catalog has been read (revision 0 is the empty table before it): the relay is ready."""
        return self.revision > 0

    @property
    def models(self) -> list[str]:
        return sorted(self._by_model)

    def candidates(self, model: str) -> list[Channel]:
        """Channels for ``model`` in the order to try them (empty when nobody serves it)."""
        single = self._single.get(model)
        if single is not None:
            return single
        channels = self._by_model.get(model)
        if not channels:
            return []
        ordered: list[Channel] = []
        for priority in sorted({c.priority for c in channels}, reverse=True):
            group = [c for c in channels if c.priority == priority]
            # Weighted random order without replacement (Efraimidis-Spirakis keys).
            group.sort(key=lambda c: random.random() ** (1.0 / c.weight), reverse=True)
            ordered.extend(group)
        return ordered


class ChannelDirectory:
    """Keeps a :class:`ChannelTable` current by polling the catalog's revision."""

    def __init__(self, stub: CatalogServiceAsyncStub, *, refresh_s: float, rpc_timeout_s: float) -> None:
        self._stub = stub
        self._refresh_s = refresh_s
        self._timeout = rpc_timeout_s
        self.table = ChannelTable()
        self._listeners: list[Callable[[ChannelTable], None]] = []
        self._task: asyncio.Task[None] | None = None

    def on_change(self, listener: Callable[[ChannelTable], None]) -> None:
        """Call ``listener`` with every new table (right after it replaced the old one)."""
        self._listeners.append(listener)

    async def start(self, *, wait_s: float = 5.0) -> None:
        """Load the table, waiting up to ``wait_s`` for the catalog (services may start in any order);
        after that the relay starts anyway and keeps trying in the background."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            try:
                await self.refresh()
                break
            except GatewayError:
                if loop.time() >= deadline:
                    log.warning("channel catalog unavailable at startup; retrying in the background")
                    break
                await asyncio.sleep(0.1)
        self._task = asyncio.create_task(self._poll(), name="channel-refresh")

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)

    async def refresh(self, *, consistent: bool = False) -> None:
        """Load the catalog if it changed; ``consistent`` reads it from the primary (after an edit)."""
        listing = await call(
            self._stub.ListChannels,
            ListChannelsRequest(known_revision=self.table.revision, consistent=consistent),
            timeout=self._timeout,
        )
        if listing.unchanged:
            return
        channels = []
        for message in listing.channels:
            if not message.enabled:
                continue
            try:
                channels.append(Channel.from_message(message))
            except ValueError as exc:
                # A channel type this relay does not know (a newer catalog): never sent a wrong format.
                log.error("channel skipped: %s", exc, extra={"channel": message.name})
        self.table = ChannelTable(channels, listing.revision)
        for listener in self._listeners:
            listener(self.table)
        log.info("channel table updated", extra={"revision": listing.revision, "channels": len(channels)})

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            try:
                await self.refresh()
            except GatewayError as exc:
                log.warning("channel refresh failed: %s", exc.message)
