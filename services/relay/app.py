"""The relay's composition root: ``create_app(settings)`` builds the FastAPI app whose lifespan owns
every async resource of the process (gRPC channels, the upstream pool, the Kafka publisher, the
channel directory) and closes them in reverse order on shutdown."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI

from services.common.events import EventPublisher, ensure_topics
from services.common.grpc import channel
from services.common.pb.relaygate.auth.v1.auth_pb2_grpc import AuthServiceStub
from services.common.pb.relaygate.logger.v1.logger_pb2_grpc import LoggerServiceStub
from services.common.pb.relaygate.quota.v1.quota_pb2_grpc import QuotaServiceStub
from services.common.redis import redis_client
from services.relay import admin, openai_errors, routes
from services.relay.accounting import Meter
from services.relay.channels import ChannelDirectory
from services.relay.deps import Gateway
from services.relay.principals import Authenticator, InvalidationListener
from services.relay.proxy import Upstreams
from services.relay.settings import RelaySettings


@contextlib.asynccontextmanager
async def open_gateway(settings: RelaySettings) -> AsyncIterator[Gateway]:
    async with contextlib.AsyncExitStack() as stack:
        auth_channel = channel(settings.auth_addr)
        stack.push_async_callback(auth_channel.close, None)
        quota_channel = channel(settings.quota_addr)
        stack.push_async_callback(quota_channel.close, None)
        logger_channel = channel(settings.logger_addr)
        stack.push_async_callback(logger_channel.close, None)

        client = httpx.AsyncClient(
            limits=httpx.Limits(
                max_connections=settings.upstream_max_connections,
                max_keepalive_connections=settings.upstream_max_keepalive,
                keepalive_expiry=settings.upstream_keepalive_expiry_s,
            ),
            http1=True,
            http2=settings.upstream_http2,
            follow_redirects=False,
            trust_env=False,
        )
        stack.push_async_callback(client.aclose)

        publisher: EventPublisher | None = None
        if settings.events_enabled:
            await ensure_topics(settings)
            publisher = EventPublisher(settings)
            await publisher.start()
            stack.push_async_callback(publisher.close)

        authenticator = Authenticator(
            AuthServiceStub(auth_channel),
            ttl_s=settings.auth_cache_ttl_s,
            rpc_timeout_s=settings.rpc_timeout_s,
        )
        if settings.redis_url:
            redis = redis_client(settings.redis_url)
            stack.push_async_callback(redis.aclose)
            listener = InvalidationListener(redis, authenticator)
            await listener.start()
            stack.push_async_callback(listener.close)

        quota = QuotaServiceStub(quota_channel)
        directory = ChannelDirectory(
            quota, refresh_s=settings.channel_refresh_s, rpc_timeout_s=settings.rpc_timeout_s
        )
        await directory.start()
        stack.push_async_callback(directory.close)

        yield Gateway(
            settings=settings,
            authenticator=authenticator,
            channels=directory,
            upstreams=Upstreams(client, max_attempts=settings.max_attempts),
            meter=Meter(quota, publisher, rpc_timeout_s=settings.rpc_timeout_s),
            auth=AuthServiceStub(auth_channel),
            quota=quota,
            logger=LoggerServiceStub(logger_channel),
        )


def create_app(settings: RelaySettings) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[dict[str, Gateway]]:
        async with open_gateway(settings) as gateway:
            yield {"gateway": gateway}

    app = FastAPI(title="relaygate", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    openai_errors.install(app)
    app.include_router(routes.router)
    app.include_router(admin.router)
    return app
