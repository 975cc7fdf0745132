"""The relay's composition root: ``create_app(settings)`` builds the ASGI app whose lifespan owns every
async resource of the process (gRPC channels, the channel pools, the Kafka publisher and its spool,
Redis, the channel directory, running streams) and closes them in reverse order on shutdown.

On SIGTERM uvicorn stops accepting connections and waits for in-flight requests; then the lifespan
lets detached stream drains settle, hands queued usage events to Kafka (or the spool), and closes.
Each close is a timed, bounded step (:mod:`services.relay.edge.http.shutdown`), and the drain and the
whole way out are bounded by :mod:`services.relay.edge.http.server`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI
from redis.asyncio import Redis

from services.common import tracing
from services.common.grpc import channel
from services.common.pb.relaygate.auth.v1.auth_pb2_grpc import AuthServiceStub
from services.common.pb.relaygate.catalog.v1.catalog_pb2_grpc import CatalogServiceStub
from services.common.pb.relaygate.logger.v1.logger_pb2_grpc import LoggerServiceStub
from services.common.pb.relaygate.quota.v1.quota_pb2_grpc import QuotaServiceStub
from services.common.perfboard import Board, instance_name
from services.common.redis import redis_client
from services.common.tls import AUTH, LOGGER, QUOTA, load_tls
from services.relay.edge.grpc.server import grpc_front
from services.relay.edge.http import admin, admin_docs, openai_errors
from services.relay.edge.http.front import Front
from services.relay.edge.http.shutdown import SHUTDOWN_CLOCK, ShutdownClock, ShutdownSteps
from services.relay.meter.accounting import LeaseAdmission, Meter, SettleRetry
from services.relay.meter.leasing import Leasing
from services.relay.meter.perf import PerfRecorder
from services.relay.meter.prices import PriceCache
from services.relay.meter.publisher import EventPublisher
from services.relay.meter.slots import StreamSlots
from services.relay.pipeline.breaker_resets import BreakerResets
from services.relay.pipeline.cache import ResponseCache
from services.relay.pipeline.gateway import Gateway
from services.relay.pipeline.performance import RelaySnapshot
from services.relay.pipeline.principals import Authenticator, InvalidationListener
from services.relay.settings import RelaySettings
from services.relay.stream.streaming import StreamPolicy, Streams
from services.relay.upstream.breaker import BreakerPolicy, Breakers
from services.relay.upstream.channels import ChannelDirectory, ChannelTable
from services.relay.upstream.fetch import FetchPolicy, ImageFetcher
from services.relay.upstream.pools import ChannelPools, PoolLimits
from services.relay.upstream.proxy import Upstreams

# Deadlines of the shutdown steps (see services/relay/edge/http/shutdown.py), over the bounds each
# component keeps itself: a close that only cancels a task or drops sockets, ...
_QUICK_S = 2.0
# ... the time a component takes to cancel what overran its own bound ...
_CUT_S = 5.0
# ... and the publisher's, past its event_shutdown_timeout_s: spooling what Kafka did not take, and
# dropping a producer that cannot flush (aiokafka's stop is given 2 s).
_SPOOL_S = 5.0


def breaker_policy(settings: RelaySettings) -> BreakerPolicy:
    return BreakerPolicy(
        window_s=settings.breaker_window_s,
        min_requests=settings.breaker_min_requests,
        failure_ratio=settings.breaker_failure_ratio,
        open_s=settings.breaker_open_s,
        max_open_s=settings.breaker_max_open_s,
        throttle_s=settings.breaker_throttle_s,
        min_callers=settings.breaker_min_callers,
    )


@contextlib.asynccontextmanager
async def open_gateway(settings: RelaySettings, clock: ShutdownClock | None = None) -> AsyncIterator[Gateway]:
    """The gateway and everything it uses; on the way out each is closed in its own timed step, within
    ``clock``'s deadline when given (see :mod:`services.relay.edge.http.shutdown`)."""
    async with contextlib.AsyncExitStack() as stack:
        steps = ShutdownSteps(stack, clock)
        steps.enter_sync("tracing", tracing.traced("relay"))
        tls = load_tls(settings, environment=settings.environment)
        auth_channel = channel(settings.auth_addr, tls=tls, peer=AUTH)
        steps.push("auth_channel", functools.partial(auth_channel.close, None), deadline_s=_QUICK_S)
        quota_channel = channel(settings.quota_addr, tls=tls, peer=QUOTA)
        steps.push("quota_channel", functools.partial(quota_channel.close, None), deadline_s=_QUICK_S)
        # Its own channel even at quota's address: moving the catalog elsewhere is then a setting
        # (and the certificate it is checked against, today quota's that hosts it).
        catalog_channel = channel(settings.catalog_address, tls=tls, peer=QUOTA)
        steps.push("catalog_channel", functools.partial(catalog_channel.close, None), deadline_s=_QUICK_S)
        logger_channel = channel(settings.logger_addr, tls=tls, peer=LOGGER)
        steps.push("logger_channel", functools.partial(logger_channel.close, None), deadline_s=_QUICK_S)

        perf = PerfRecorder()
        publisher: EventPublisher | None = None
        if settings.events_enabled:
            publisher = EventPublisher(
                settings,
                spool_dir=Path(settings.event_spool_dir),
                spool_max_bytes=settings.event_spool_max_bytes,
                max_queue=settings.event_queue_max,
                retain_s=settings.event_retain_s,
                shutdown_timeout_s=settings.event_shutdown_timeout_s,
            )
            publisher.on_produced = perf.produced
            await publisher.start()
            # What it has not delivered when its time is up it spools, even cut short; the steps
            # before it leave it the time to drop its producer too.
            steps.push(
                "publisher",
                publisher.close,
                deadline_s=settings.event_shutdown_timeout_s + _SPOOL_S,
                reserve_s=_QUICK_S,
            )

        authenticator = Authenticator(
            AuthServiceStub(auth_channel),
            ttl_s=settings.auth_cache_ttl_s,
            fallback_ttl_s=settings.auth_cache_fallback_ttl_s,
            max_entries=settings.auth_cache_max_entries,
            rpc_timeout_s=settings.rpc_timeout_s,
        )
        breakers = Breakers(breaker_policy(settings))
        cache: ResponseCache | None = None
        redis: Redis | None = None
        if settings.redis_url:
            redis = redis_client(settings.redis_url)
            steps.push("redis", redis.aclose, deadline_s=_QUICK_S)
        breaker_resets = BreakerResets(redis, breakers)
        if redis is not None:
            # Key changes and breaker resets arrive on one subscription.
            listener = InvalidationListener(
                redis, authenticator, also={breaker_resets.channel: breaker_resets.heard}
            )
            await listener.start()
            steps.push("key_invalidations", listener.close, deadline_s=_QUICK_S)
            cache = ResponseCache(
                redis,
                ttl_s=settings.response_cache_ttl_s,
                max_bytes=settings.response_cache_max_bytes,
                scope=settings.response_cache_scope,
                billing=settings.response_cache_billing,
            )
            steps.push("response_cache", cache.close, deadline_s=_QUICK_S)

        pools = ChannelPools(
            PoolLimits(
                max_connections=settings.upstream_max_connections,
                max_keepalive=settings.upstream_max_keepalive,
                keepalive_expiry_s=settings.upstream_keepalive_expiry_s,
                http2=settings.upstream_http2,
            )
        )
        steps.push("upstream_pools", pools.aclose, deadline_s=_QUICK_S)

        quota = QuotaServiceStub(quota_channel)
        catalog = CatalogServiceStub(catalog_channel)
        directory = ChannelDirectory(
            catalog, refresh_s=settings.channel_refresh_s, rpc_timeout_s=settings.rpc_timeout_s
        )

        def follow(table: ChannelTable) -> None:
            pools.sync(table)
            breakers.retain({c.id for c in table.channels})

        directory.on_change(follow)
        await directory.start()
        steps.push("channel_directory", directory.close, deadline_s=_QUICK_S)

        leases: LeaseAdmission | None = None
        # On a lease the usage event is the charge: no publisher, no leases.
        if settings.credit_leases and publisher is not None:
            prices = PriceCache(
                quota, refresh_s=settings.price_refresh_s, rpc_timeout_s=settings.rpc_timeout_s
            )
            await prices.start()
            steps.push("prices", prices.close, deadline_s=_QUICK_S)
            terms = settings.credit_terms()
            leasing = Leasing(
                quota, terms, rpc_timeout_s=settings.rpc_timeout_s, shutdown_s=settings.credit_shutdown_s
            )
            leasing.start()
            # Runs after the meter's pending settlements (below): every admission is finished by then.
            steps.push(
                "leases",
                leasing.close,
                deadline_s=settings.credit_shutdown_s + settings.rpc_timeout_s + _QUICK_S,
            )
            leases = LeaseAdmission(leasing, prices)

        meter = Meter(
            quota,
            publisher,
            rpc_timeout_s=settings.rpc_timeout_s,
            retry=SettleRetry(window_s=settings.settle_retry_s),
            leases=leases,
            perf=perf,
        )
        # Runs after the streams (below) settle, and before quota's channel and the publisher close.
        steps.push(
            "settlements",
            functools.partial(meter.close, timeout=settings.settle_shutdown_s),
            deadline_s=settings.settle_shutdown_s + _CUT_S + _QUICK_S,
        )
        streams = Streams(
            StreamPolicy(
                idle_timeout_s=settings.stream_idle_timeout_s,
                keepalive_s=settings.stream_keepalive_s,
                drain_s=settings.stream_drain_s,
                max_drains=settings.stream_max_drains,
            )
        )
        # Runs first on the way out: streams still draining settle while quota and Kafka are there.
        steps.push(
            "streams",
            functools.partial(streams.close, timeout=settings.stream_drain_s + _CUT_S),
            deadline_s=settings.stream_drain_s + 2 * _CUT_S + _QUICK_S,
        )
        upstreams = Upstreams(pools, breakers, max_attempts=settings.max_attempts)

        snapshot = RelaySnapshot(
            instance_name("relay"), perf, streams=streams, upstreams=upstreams, channels=directory
        )
        board = Board(redis, snapshot.instance, snapshot)
        board.start()
        steps.push("performance_board", board.close, deadline_s=_QUICK_S)
        images = ImageFetcher(
            FetchPolicy(
                allow_http=settings.fetch_allow_http,
                allow_hosts=frozenset(settings.fetch_allow_hosts),
                max_bytes=settings.fetch_max_bytes,
                timeout_s=settings.fetch_timeout_s,
                max_redirects=settings.fetch_max_redirects,
                max_images=settings.fetch_max_images,
                image_types=frozenset(settings.fetch_image_types),
            )
        )
        steps.push("image_fetcher", images.aclose, deadline_s=_QUICK_S)

        yield Gateway(
            settings=settings,
            authenticator=authenticator,
            channels=directory,
            upstreams=upstreams,
            streams=streams,
            stream_slots=StreamSlots(settings.max_streams_per_key),
            meter=meter,
            cache=cache,
            auth=AuthServiceStub(auth_channel),
            quota=quota,
            catalog=catalog,
            logger=LoggerServiceStub(logger_channel),
            performance=board,
            breaker_resets=breaker_resets,
            images=images,
        )


def create_app(settings: RelaySettings) -> Front:
    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[dict[str, object]]:
        clock = ShutdownClock()
        async with contextlib.AsyncExitStack() as stack:
            gateway = await stack.enter_async_context(open_gateway(settings, clock))
            await ShutdownSteps(stack, clock).enter_async(
                "grpc_front", grpc_front(gateway), deadline_s=settings.grpc_drain_seconds + _CUT_S
            )
            # The server sets the clock when the signal comes (services/relay/edge/http/server.py).
            yield {"gateway": gateway, SHUTDOWN_CLOCK: clock}

    # No slash redirects: they would send clients to whatever the Host header names; an unknown path
    # is a 404 like any other.
    app = FastAPI(
        title="relaygate",
        lifespan=lifespan,
        docs_url=admin_docs.DOCS_URL,
        redoc_url=None,
        openapi_url=admin_docs.OPENAPI_URL,
        redirect_slashes=False,
    )
    openai_errors.install(app)
    app.include_router(admin.router)
    admin_docs.install(app)
    return Front(app)
