"""The auth process: owns the database, the Redis client and the last-used writer, and serves gRPC."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from services.auth.bootstrap import ensure_admin_key
from services.auth.cache import MemoryPrincipalCache, PrincipalCache, RedisPrincipalCache
from services.auth.servicer import AuthServicer
from services.auth.settings import AuthSettings
from services.auth.store import AuthStore
from services.auth.tokens import TokenAuthority
from services.common import tracing
from services.common.clock import Clock, SystemClock
from services.common.db import Database
from services.common.grpc import Registration, serve
from services.common.pb.relaygate.auth.v1 import auth_pb2, auth_pb2_grpc
from services.common.perfboard import service_board
from services.common.redis import redis_client
from services.common.rpc_auth import ServerSecurity
from services.common.tasks import cancel_and_wait
from services.common.tls import load_tls

log = logging.getLogger(__name__)

SERVICE_NAME = auth_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name

# Redis is only a cache here: give up quickly and read the database instead. One immediate retry
# replaces a pooled connection that died with a Redis restart.


async def run(
    settings: AuthSettings,
    *,
    stop: asyncio.Event | None = None,
    on_started: Callable[[int], None] | None = None,
) -> None:
    """Serve AuthService until SIGTERM/SIGINT (or ``stop``); every resource is closed on the way out."""
    clock: Clock = SystemClock()
    tls = load_tls(settings, environment=settings.environment)
    async with contextlib.AsyncExitStack() as stack:
        stack.enter_context(tracing.traced("auth"))
        db = Database(settings)
        await db.start()
        stack.push_async_callback(db.close)

        cache: PrincipalCache
        if settings.redis_url:
            redis = redis_client(settings.redis_url)
            stack.push_async_callback(redis.aclose)
            cache = RedisPrincipalCache(redis, ttl_s=settings.cache_ttl_s, clock=clock)
            stack.push_async_callback(service_board(redis, "auth").close)
        else:
            cache = MemoryPrincipalCache(ttl_s=settings.cache_ttl_s, clock=clock)

        store = AuthStore(db)
        if settings.bootstrap_admin_key:
            await ensure_admin_key(
                store, api_key=settings.bootstrap_admin_key, pepper=settings.key_pepper, now=int(clock.time())
            )
        flusher = asyncio.create_task(store.flush_periodically(settings.last_used_flush_s), name="last-used")
        stack.push_async_callback(_stop_flusher, flusher, store)

        tokens = TokenAuthority(
            settings.admin_token_secret,
            default_ttl_s=settings.admin_token_ttl_s,
            max_ttl_s=settings.admin_token_max_ttl_s,
        )
        servicer = AuthServicer(
            store=store, cache=cache, pepper=settings.key_pepper, tokens=tokens, clock=clock
        )
        log.info("auth starting", extra={"listen": settings.auth_listen, "cache": cache.name})

        async def check_admin_token(token: str, scope: str, client_ip: str) -> None:
            await servicer.admin_claims(token, required_scope=scope, client_ip=client_ip)

        await serve(
            [Registration(SERVICE_NAME, servicer, auth_pb2_grpc.add_AuthServiceServicer_to_server)],
            listen=settings.auth_listen,
            drain_seconds=settings.grpc_drain_seconds,
            security=ServerSecurity(
                tls, admin_tokens=check_admin_token, health_listen=settings.grpc_health_listen
            ),
            stop=stop,
            on_started=on_started,
        )


async def _stop_flusher(flusher: asyncio.Task[None], store: AuthStore) -> None:
    """Cancel the periodic writer, then write what the last requests left behind."""
    await cancel_and_wait(flusher)
    try:
        await store.flush_last_used()
    except Exception:
        log.warning("could not write last-used times on shutdown", exc_info=True)
