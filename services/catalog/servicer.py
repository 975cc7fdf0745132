"""CatalogService over gRPC: translation between protobuf messages and the catalog store, nothing more.

Errors are :class:`~services.common.errors.GatewayError` subclasses raised by the store; the server
interceptor in ``services.common.grpc`` turns them into status codes and trailing metadata.
"""

from __future__ import annotations

from typing import Any

import grpc

from services.catalog.channel import Channel
from services.catalog.store import Catalog
from services.common.grpc import Registration
from services.common.pb.relaygate.catalog.v1 import catalog_pb2 as pb
from services.common.pb.relaygate.catalog.v1 import catalog_pb2_grpc

__all__ = ["SERVICE_NAME", "CatalogServicer", "channel_from_pb", "channel_to_pb", "registration"]

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["CatalogService"].full_name

Context = grpc.aio.ServicerContext[Any, Any]


def channel_to_pb(channel: Channel) -> pb.Channel:
    return pb.Channel(
        channel_id=channel.channel_id,
        name=channel.name,
        base_url=channel.base_url,
        api_key=channel.api_key,
        models=list(channel.models),
        model_map=dict(channel.model_map),
        priority=channel.priority,
        weight=channel.weight,
        headers=dict(channel.headers),
        connect_timeout_ms=channel.connect_timeout_ms,
        first_byte_timeout_ms=channel.first_byte_timeout_ms,
        total_timeout_ms=channel.total_timeout_ms,
        max_connections=channel.max_connections,
        enabled=channel.enabled,
        type=channel.type,
        api_version=channel.api_version,
    )


def channel_from_pb(message: pb.Channel) -> Channel:
    return Channel(
        channel_id=message.channel_id,
        name=message.name,
        base_url=message.base_url,
        api_key=message.api_key,
        models=tuple(message.models),
        model_map=dict(message.model_map),
        priority=message.priority,
        weight=message.weight,
        headers=dict(message.headers),
        connect_timeout_ms=message.connect_timeout_ms,
        first_byte_timeout_ms=message.first_byte_timeout_ms,
        total_timeout_ms=message.total_timeout_ms,
        max_connections=message.max_connections,
        enabled=message.enabled,
        type=message.type,
        api_version=message.api_version,
    )


class CatalogServicer(catalog_pb2_grpc.CatalogServiceServicer):
    """``relaygate.catalog.v1.CatalogService``."""

    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog

    async def UpsertChannel(self, request: pb.Channel, context: Context) -> pb.Channel:
        return channel_to_pb(await self._catalog.upsert_channel(channel_from_pb(request)))

    async def DeleteChannel(
        self, request: pb.DeleteChannelRequest, context: Context
    ) -> pb.DeleteChannelResponse:
        return pb.DeleteChannelResponse(deleted=await self._catalog.delete_channel(request.channel_id))

    async def ListChannels(self, request: pb.ListChannelsRequest, context: Context) -> pb.ChannelList:
        listing = await self._catalog.list_channels(request.known_revision, consistent=request.consistent)
        return pb.ChannelList(
            revision=listing.revision,
            unchanged=listing.unchanged,
            channels=[channel_to_pb(c) for c in listing.channels],
        )


def registration(catalog: Catalog) -> Registration:
    """CatalogService on ``catalog``, for whichever process hosts it (today quota's gRPC server)."""
    return Registration(
        SERVICE_NAME, CatalogServicer(catalog), catalog_pb2_grpc.add_CatalogServiceServicer_to_server
    )
