"""The quota process's composition root: every resource is created once here and closed in reverse."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from services.common.clock import Clock, SystemClock
from services.common.db import Database
from services.common.grpc import Registration, serve
from services.common.pb.relaygate.quota.v1 import quota_pb2_grpc
from services.quota.catalog import Catalog
from services.quota.ledger import Ledger
from services.quota.pricing import PriceBook
from services.quota.servicer import SERVICE_NAME, QuotaServicer
from services.quota.settings import QuotaSettings

__all__ = ["run", "sweep_expired"]

log = logging.getLogger(__name__)


async def run(
    settings: QuotaSettings,
    *,
    stop: asyncio.Event | None = None,
    on_started: Callable[[int], None] | None = None,
    clock: Clock | None = None,
) -> None:
    """Serve QuotaService until SIGTERM/SIGINT (or ``stop``), sweeping expired holds meanwhile.

    ``on_started`` receives the bound port; ``clock`` replaces the system clock (tests).
    """
    clock = clock or SystemClock()
    async with contextlib.AsyncExitStack() as stack:
        db = Database(settings)
        stack.push_async_callback(db.close)
        await db.start()

        prices = PriceBook(db, clock=clock, cache_ttl_s=settings.price_cache_ttl_s)
        ledger = Ledger(
            db,
            prices,
            clock=clock,
            reservation_ttl_s=settings.reservation_ttl_s,
            allow_overage=settings.allow_overage,
            expiry_batch_size=settings.expiry_batch_size,
        )
        catalog = Catalog(db, clock=clock)

        sweeper = asyncio.create_task(
            sweep_expired(ledger, settings.expiry_sweep_interval_s), name="quota-expiry-sweeper"
        )
        stack.push_async_callback(_cancel, sweeper)

        servicer = QuotaServicer(ledger=ledger, prices=prices, catalog=catalog)
        await serve(
            [Registration(SERVICE_NAME, servicer, quota_pb2_grpc.add_QuotaServiceServicer_to_server)],
            listen=settings.quota_listen,
            drain_seconds=settings.grpc_drain_seconds,
            stop=stop,
            on_started=on_started,
        )


async def sweep_expired(ledger: Ledger, interval_s: float) -> None:
    """Expire abandoned holds every ``interval_s`` until cancelled; a failed sweep is retried next time."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await ledger.expire_due()
        except Exception:
            # Typically the primary is unreachable; holds stay held (never lost) until a sweep succeeds.
            log.warning("expiry sweep failed", exc_info=True)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
