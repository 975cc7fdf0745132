"""What request handlers receive: the process's :class:`Gateway`, injected with ``GatewayDep`` (FastAPI
routes) or read from the ASGI scope's lifespan state (the OpenAI front)."""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request

from services.relay.accounting import Meter
from services.relay.cache import ResponseCache
from services.relay.channels import ChannelDirectory
from services.relay.principals import Authenticator
from services.relay.proxy import Upstreams
from services.relay.settings import RelaySettings
from services.relay.slots import StreamSlots
from services.relay.streaming import Streams

if TYPE_CHECKING:
    from services.common.pb.relaygate.auth.v1.auth_pb2_grpc import AuthServiceAsyncStub
    from services.common.pb.relaygate.catalog.v1.catalog_pb2_grpc import CatalogServiceAsyncStub
    from services.common.pb.relaygate.logger.v1.logger_pb2_grpc import LoggerServiceAsyncStub
    from services.common.pb.relaygate.quota.v1.quota_pb2_grpc import QuotaServiceAsyncStub


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


def gateway_of(scope: MutableMapping[str, Any]) -> Gateway:
    gateway: Gateway = scope["state"]["gateway"]
    return gateway


# async: a plain ``def`` dependency would run in FastAPI's thread pool, a thread hop per request.
async def get_gateway(request: Request) -> Gateway:
    gateway: Gateway = request.state.gateway
    return gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]
