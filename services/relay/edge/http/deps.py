"""How HTTP handlers receive the process's :class:`~services.relay.pipeline.gateway.Gateway`: injected
with ``GatewayDep`` (FastAPI routes) or read from the ASGI scope's lifespan state (the OpenAI front)."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Annotated, Any

from fastapi import Depends, Request

from services.relay.pipeline.gateway import Gateway


def gateway_of(scope: MutableMapping[str, Any]) -> Gateway:
    gateway: Gateway = scope["state"]["gateway"]
    return gateway


# async: a plain ``def`` dependency would run in FastAPI's thread pool, a thread hop per request.
async def get_gateway(request: Request) -> Gateway:
    gateway: Gateway = request.state.gateway
    return gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]
