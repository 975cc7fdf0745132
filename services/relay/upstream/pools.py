"""One connection pool per channel, for the life of the process (or of the channel).

A pool is created on a channel's first request and kept while the channel is in the table with the
same origin and connection limit. A channel that leaves the table, or changes either, has its pool
retired: no new requests, and it is closed once its in-flight requests are over (bounded by the
channel's total timeout). Everything is closed at shutdown. Pool sizes are exported as metrics on
every ``/metrics`` scrape.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from services.common.telemetry import METRICS
from services.relay.upstream.channels import Channel, ChannelTable
from services.relay.upstream.transport import ChannelTransport, PoolStats

log = logging.getLogger(__name__)

_RETIRE_POLL_S = 1.0


@dataclass(frozen=True, slots=True)
class PoolLimits:
    """Process-wide bounds; a channel's own ``max_connections`` applies below ``max_connections``."""

    max_connections: int = 1000
    max_keepalive: int = 200
    keepalive_expiry_s: float = 30.0
    http2: bool = False


@dataclass(frozen=True, slots=True)
class _Entry:
    transport: ChannelTransport
    # What the pool was built from; a change means a new pool.
    origin: bytes
    max_connections: int
    name: str


class ChannelPools:
    """The channels' transports; owned by the relay's lifespan (:meth:`aclose` at shutdown)."""

    def __init__(self, limits: PoolLimits) -> None:
        self._limits = limits
        self._entries: dict[str, _Entry] = {}
        self._retiring: dict[asyncio.Task[None], _Entry] = {}
        self._closed = False

    def get(self, channel: Channel) -> ChannelTransport:
        """The pool of ``channel``, created on first use."""
        entry = self._entries.get(channel.id)
        if entry is None:
            entry = self._create(channel)
        return entry.transport

    def stats(self, channel_id: str) -> PoolStats | None:
        """The pool of ``channel_id`` right now, None before its first request."""
        entry = self._entries.get(channel_id)
        return entry.transport.stats() if entry is not None else None

    def _create(self, channel: Channel) -> _Entry:
        if self._closed:
            raise RuntimeError("the upstream pools are closed")
        size = min(channel.max_connections, self._limits.max_connections)
        transport = ChannelTransport(
            channel.base_url,
            max_connections=size,
            max_idle=min(size, self._limits.max_keepalive),
            keepalive_expiry=self._limits.keepalive_expiry_s,
            http2=self._limits.http2,
            on_connect=METRICS.upstream_connect.labels(channel=channel.name).observe,
        )
        entry = _Entry(transport, channel.base_url.encode(), channel.max_connections, channel.name)
        self._entries[channel.id] = entry
        return entry

    def sync(self, table: ChannelTable) -> None:
        """Retire the pools of channels that left ``table`` or changed their origin or limit."""
        current = {channel.id: channel for channel in table.channels}
        for channel_id, entry in list(self._entries.items()):
            channel = current.get(channel_id)
            if (
                channel is None
                or channel.base_url.encode() != entry.origin
                or channel.max_connections != entry.max_connections
            ):
                del self._entries[channel_id]
                deadline = channel.total_timeout_s if channel is not None else 600.0
                task = asyncio.get_running_loop().create_task(self._retire(entry, deadline))
                self._retiring[task] = entry
                task.add_done_callback(self._forget_task)

    def _forget_task(self, task: asyncio.Task[None]) -> None:
        self._retiring.pop(task, None)

    async def _retire(self, entry: _Entry, deadline_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(deadline_s):
                while entry.transport.stats().in_flight:
                    await asyncio.sleep(_RETIRE_POLL_S)
        await entry.transport.aclose()
        self._forget_metrics(entry.name)
        log.info("upstream pool closed", extra={"channel": entry.name})

    def export_metrics(self) -> None:
        """Set the pool gauges from the live pools (called right before a scrape)."""
        for entry in self._entries.values():
            stats = entry.transport.stats()
            METRICS.upstream_pool_connections.labels(channel=entry.name, state="idle").set(stats.idle)
            METRICS.upstream_pool_connections.labels(channel=entry.name, state="busy").set(
                stats.connections - stats.idle
            )
            METRICS.upstream_pool_waiting.labels(channel=entry.name).set(stats.waiting)

    @staticmethod
    def _forget_metrics(name: str) -> None:
        for state in ("idle", "busy"):
            with contextlib.suppress(KeyError):
                METRICS.upstream_pool_connections.remove(name, state)
        with contextlib.suppress(KeyError):
            METRICS.upstream_pool_waiting.remove(name)

    async def aclose(self) -> None:
        """Close every pool now (shutdown: in-flight requests have been drained by then)."""
        self._closed = True
        retiring, self._retiring = self._retiring, {}
        for task in retiring:
            task.cancel()
        entries = [*self._entries.values(), *retiring.values()]
        self._entries = {}
        for entry in entries:
            await entry.transport.aclose()
