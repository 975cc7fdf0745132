"""The process's :class:`Gateway`: every part a request passes through, whichever front it came in by."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.common.perfboard import Board
from services.relay.meter.accounting import Meter
from services.relay.meter.slots import StreamSlots
from services.relay.pipeline.breaker_resets import BreakerResets
from services.relay.pipeline.cache import ResponseCache
from services.relay.pipeline.principals import Authenticator
from services.relay.settings import RelaySettings
from services.relay.stream.streaming import Streams
from services.relay.upstream.channels import ChannelDirectory
from services.relay.upstream.fetch import ImageFetcher
from services.relay.upstream.proxy import Upstreams

if TYPE_CHECKING:
    from services.common.pb.relaygate.auth.v1.auth_pb2_grpc import AuthServiceAsyncStub
    from services.common.pb.relaygate.catalog.v1.catalog_pb2_grpc import CatalogServiceAsyncStub
    from services.common.pb.relaygate.logger.v1.logger_pb2_grpc import LoggerServiceAsyncStub
    from services.common.pb.relaygate.quota.v1.quota_pb2_grpc import QuotaServiceAsyncStub

__all__ = ["Gateway"]


@dataclass(frozen=True)
class Gateway:
    """Everything a request handler may use; one per process, owned by the app's lifespan."""

    settings: RelaySettings
    authenticator: Authenticator
    channels: ChannelDirectory
    upstreams: Upstreams
    streams: Streams
    stream_slots: StreamSlots
    meter: Meter
    # None without Redis: the response cache is then off.
    cache: ResponseCache | None
    auth: AuthServiceAsyncStub
    quota: QuotaServiceAsyncStub
    catalog: CatalogServiceAsyncStub
    logger: LoggerServiceAsyncStub
    # The performance board this relay posts its snapshot to and reads every process's from.
    performance: Board | None = None
    # Closes a channel's breaker on every relay (the admin API's reset).
    breaker_resets: BreakerResets | None = None
    # Fetches image URLs for channels that take images inline only (pipeline/media.py); None: sent as URLs.
    images: ImageFetcher | None = None
