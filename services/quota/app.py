"""The quota process's composition root: every resource is created once here and closed in reverse."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from services.catalog.servicer import registration as catalog_registration
from services.catalog.store import Catalog
from services.common import tracing
from services.common.admin_tokens import checked_by_auth
from services.common.clock import Clock, SystemClock
from services.common.db import Database
from services.common.grpc import Registration, serve
from services.common.pb.relaygate.quota.v1 import quota_pb2_grpc
from services.common.perfboard import service_board
from services.common.redis import redis_client
from services.common.tasks import cancel_and_wait
from services.common.tls import load_tls
from services.quota.budgets import Budgets, Calendar
from services.quota.leasing import CreditStore
from services.quota.ledger import BatchPolicy, Ledger
from services.quota.limits import GuardedLimiter, Limiter, LocalLimiter
from services.quota.pricing import PriceBook
from services.quota.redis_limits import RedisLimiter
from services.quota.servicer import SERVICE_NAME, QuotaServicer
from services.quota.settings import QuotaSettings
from services.quota.settling import settling

__all__ = ["run", "sweep_expired"]

log = logging.getLogger(__name__)


async def run(
    settings: QuotaSettings,
    *,
    stop: asyncio.Event | None = None,
    on_started: Callable[[int], None] | None = None,
    clock: Clock | None = None,
) -> None:
    """Serve QuotaService and CatalogService until SIGTERM/SIGINT (or ``stop``), sweeping expired
    holds meanwhile.

    ``on_started`` receives the bound port; ``clock`` replaces the system clock (tests).
    """
    clock = clock or SystemClock()
    tls = load_tls(settings, environment=settings.environment)
    async with contextlib.AsyncExitStack() as stack:
        stack.enter_context(tracing.traced("quota"))
        db = Database(settings)
        stack.push_async_callback(db.close)
        await db.start()

        limiter: Limiter
        if settings.redis_url:
            redis = redis_client(settings.redis_url)
            stack.push_async_callback(redis.aclose)
            stack.push_async_callback(service_board(redis, "quota").close)
            shared = RedisLimiter(redis, clock=clock)
            stack.push_async_callback(shared.close)
            limiter = GuardedLimiter(
                shared,
                clock=clock,
                fail_open=settings.limits_fail_open,
                retry_interval_s=settings.limits_retry_interval_s,
            )
        else:
            # Embedded default: one quota process, so in-process limits are exact.
            limiter = LocalLimiter(clock)
        log.info(
            "limits",
            extra={
                "state": "redis" if settings.redis_url else "in-process",
                "fail_open": settings.limits_fail_open,
            },
        )

        prices = PriceBook(db, clock=clock, cache_ttl_s=settings.price_cache_ttl_s)
        calendar = Calendar(settings.budget_timezone)
        credit = CreditStore(db, calendar, settings.credit_terms(), clock)
        ledger = Ledger(
            db,
            prices,
            clock=clock,
            reservation_ttl_s=settings.reservation_ttl_s,
            allow_overage=settings.allow_overage,
            expiry_batch_size=settings.expiry_batch_size,
            limiter=limiter,
            calendar=calendar,
            batching=BatchPolicy(settings.ledger_batch_max, settings.ledger_batch_concurrency),
            replica_wait_s=settings.replica_wait_s,
            credit=credit,
        )
        # Runs after the server has drained: the last batches commit before the pools close.
        stack.push_async_callback(ledger.close)
        budgets = Budgets(db, clock=clock, calendar=calendar)
        catalog = Catalog(db, clock=clock)

        sweeper = asyncio.create_task(
            sweep_expired(ledger, credit, settings.expiry_sweep_interval_s), name="quota-expiry-sweeper"
        )
        stack.push_async_callback(cancel_and_wait, sweeper)
        if settings.kafka_bootstrap:
            # Held requests (leased or exact) are charged by their usage events; the last batch is
            # charged before the pools close.
            await stack.enter_async_context(settling(settings, credit, ledger))

        servicer = QuotaServicer(ledger=ledger, prices=prices, budgets=budgets, credit=credit)
        security = await stack.enter_async_context(
            checked_by_auth(
                tls,
                auth_addr=settings.auth_addr,
                rpc_timeout_s=settings.rpc_timeout_s,
                cache_s=settings.admin_token_cache_s,
                health_listen=settings.grpc_health_listen,
                clock=clock,
            )
        )
        await serve(
            [
                Registration(SERVICE_NAME, servicer, quota_pb2_grpc.add_QuotaServiceServicer_to_server),
                # Hosted here rather than in a process of its own: it shares quota's database and
                # pools, and one fewer process to run. Clients find it at RELAYGATE_CATALOG_ADDR.
                catalog_registration(catalog),
            ],
            listen=settings.quota_listen,
            drain_seconds=settings.grpc_drain_seconds,
            security=security,
            stop=stop,
            on_started=on_started,
        )


async def sweep_expired(ledger: Ledger, credit: CreditStore, interval_s: float) -> None:
    """Expire abandoned reservations and leases every ``interval_s`` until cancelled; a failed sweep is
    retried next time."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await ledger.expire_due()
            await credit.expire_due()
            await ledger.maintain()
        except Exception:
            # Typically the primary is unreachable; holds stay held (never lost) until a sweep succeeds.
            log.warning("expiry sweep failed", exc_info=True)
