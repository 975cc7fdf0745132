"""What request handlers receive: the process's :class:`Gateway`, injected with ``GatewayDep``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from services.relay.accounting import Meter
from services.relay.channels import ChannelDirectory
from services.relay.principals import Authenticator
from services.relay.proxy import Upstreams
from services.relay.settings import RelaySettings

if TYPE_CHECKING:
    from services.common.pb.relaygate.auth.v1.auth_pb2_grpc import AuthServiceAsyncStub
    from services.common.pb.relaygate.logger.v1.logger_pb2_grpc import LoggerServiceAsyncStub
    from services.common.pb.relaygate.quota.v1.quota_pb2_grpc import QuotaServiceAsyncStub


@dataclass(frozen=True)
class Gateway:
    """Everything a request handler may use; one per process, owned by the app's lifespan."""

    settings: RelaySettings
    authenticator: Authenticator
    channels: ChannelDirectory
    upstreams: Upstreams
    meter: Meter
    auth: AuthServiceAsyncStub
    quota: QuotaServiceAsyncStub
    logger: LoggerServiceAsyncStub


def get_gateway(request: Request) -> Gateway:
    gateway: Gateway = request.state.gateway
    return gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]
