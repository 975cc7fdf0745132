"""The relay's gRPC front: the inference service on its own port, served from the relay's lifespan.

The server is the one every relaygate service runs (:func:`services.common.grpc.serve`: health,
reflection, the error interceptor, TLS with the relay's certificate), with the inference port's own
permission table (:data:`services.common.rpc_policy.FRONT_RULES`): callers need no certificate of
the deployment, since each call is authenticated by its API key; they check the relay's certificate
(``relay.relaygate.internal``, under the deployment's CA). With ``RELAYGATE_GRPC_TLS=off`` (local
development) the port is plaintext.

The front holds its calls to what HTTP holds its requests to: a request message larger than
``max_body_bytes`` is refused by gRPC itself before any handler reads it (RESOURCE_EXHAUSTED,
"Received message larger than max"), and its ``grpc.health.v1`` says NOT_SERVING until the relay is
ready as HTTP's ``/readyz`` means it (the channel table is loaded, :attr:`ChannelTable.loaded`).

uvicorn owns the process's signals: on SIGTERM it stops HTTP, then the lifespan stops this server,
which drains in-flight calls for ``grpc_drain_seconds`` before the streams' settlements are awaited.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from services.common.grpc import Registration, serve
from services.common.pb.relaygate.relay.v1 import inference_pb2_grpc
from services.common.rpc_auth import ServerSecurity
from services.common.rpc_policy import FRONT_RULES, INFERENCE_SERVICE
from services.common.tls import load_tls
from services.relay.edge.grpc.servicer import InferenceServicer
from services.relay.pipeline.gateway import Gateway
from services.relay.upstream.channels import ChannelDirectory, ChannelTable

__all__ = ["grpc_front"]


def _readiness(channels: ChannelDirectory) -> asyncio.Event:
    """Set once the channel table is loaded (at once if it is)."""
    ready = asyncio.Event()

    def follow(table: ChannelTable) -> None:
        if table.loaded:
            ready.set()

    follow(channels.table)
    channels.on_change(follow)
    return ready


@contextlib.asynccontextmanager
async def grpc_front(gateway: Gateway) -> AsyncIterator[int | None]:
    """Serve the inference service while the context is open; yields the bound port (None when
    ``RELAYGATE_RELAY_GRPC_LISTEN`` is empty: no gRPC front)."""
    settings = gateway.settings
    if not settings.relay_grpc_listen:
        yield None
        return
    security = ServerSecurity(
        tls=load_tls(settings, environment=settings.environment),
        rules=FRONT_RULES,
        client_certificates=False,
    )
    loop = asyncio.get_running_loop()
    bound: asyncio.Future[int] = loop.create_future()
    stop = asyncio.Event()
    server = loop.create_task(
        serve(
            [
                Registration(
                    INFERENCE_SERVICE,
                    InferenceServicer(gateway),
                    inference_pb2_grpc.add_InferenceServiceServicer_to_server,
                )
            ],
            listen=settings.relay_grpc_listen,
            drain_seconds=settings.grpc_drain_seconds,
            security=security,
            stop=stop,
            on_started=bound.set_result,
            signals=False,
            options=[("grpc.max_receive_message_length", settings.max_body_bytes)],
            ready=_readiness(gateway.channels),
        ),
        name="relay-grpc",
    )
    starting: set[asyncio.Future[Any]] = {server, bound}
    await asyncio.wait(starting, return_when=asyncio.FIRST_COMPLETED)
    if server.done():
        # It could not start (the port is taken, a certificate is missing): so does the relay.
        server.result()
        raise RuntimeError("the relay's gRPC server stopped while starting")
    try:
        yield bound.result()
    finally:
        stop.set()
        await server
