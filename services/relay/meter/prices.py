"""The relay's copy of the price book: the current price of every model, for admissions on leases.

A request admitted on a lease never asks quota for its price, so the relay keeps the current version of
every model's price itself: loaded from quota's ``ListPrices`` at start and every ``refresh_s`` after.
While quota cannot answer, the last known set stays in use: a quota outage must not stop keys that
already hold a lease. A model missing from the set (priced since the last load, or never) is simply not
admitted on a lease; its requests take the exact path, where quota prices them.

A price changed in quota reaches the relay within ``refresh_s`` of the first quota process listing it
(each lists its own cached book); until then a leased request is billed at the version it was admitted
with, and its usage event names that version (``price_id``). The relay keeps the newest version of each
model any listing showed it, so it never goes back to an older one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from services.common.errors import GatewayError
from services.common.grpc import call
from services.common.pb.relaygate.quota.v1.quota_pb2 import ListPricesRequest
from services.common.pb.relaygate.quota.v1.quota_pb2 import Price as PriceMessage
from services.common.pricing import DEFAULT_MAX_OUTPUT_TOKENS, Price
from services.common.tasks import cancel_and_wait

if TYPE_CHECKING:
    from services.common.pb.relaygate.quota.v1.quota_pb2_grpc import QuotaServiceAsyncStub

__all__ = ["PriceCache", "price_from_message"]

log = logging.getLogger(__name__)

# A failing refresh is logged at most this often (it is retried every refresh_s).
_WARN_EVERY_S = 30.0


def price_from_message(message: PriceMessage) -> Price:
    return Price(
        model=message.model,
        input_per_mtok=message.input_per_mtok,
        output_per_mtok=message.output_per_mtok,
        cached_input_per_mtok=message.cached_input_per_mtok,
        cache_write_per_mtok=message.cache_write_per_mtok,
        reasoning_per_mtok=message.reasoning_per_mtok,
        per_request=message.per_request,
        per_image=message.per_image,
        default_max_output_tokens=message.default_max_output_tokens or DEFAULT_MAX_OUTPUT_TOKENS,
        price_id=message.price_id,
    )


class PriceCache:
    """The newest price per model as quota last listed it; owned by the relay's lifespan."""

    def __init__(self, stub: QuotaServiceAsyncStub, *, refresh_s: float, rpc_timeout_s: float) -> None:
        self._stub = stub
        self._refresh_s = refresh_s
        self._timeout = rpc_timeout_s
        self._prices: dict[str, Price] = {}
        self._task: asyncio.Task[None] | None = None
        self._warned_at = -_WARN_EVERY_S

    def get(self, model: str) -> Price | None:
        """The model's current price, or None when this relay does not know one (exact path)."""
        return self._prices.get(model)

    def __len__(self) -> int:
        return len(self._prices)

    async def start(self) -> None:
        """One load attempt (quota may still be starting: then the first refresh fills the cache),
        and the refresh loop in the background."""
        await self._load()
        self._task = asyncio.create_task(self._poll(), name="price-refresh")

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)

    async def refresh(self) -> None:
        """Take in quota's current listing; raises :class:`GatewayError` when quota cannot answer
        (the old set stays).

        Merged, never replaced: price versions are only ever added (a newer one has a higher id), and
        each quota process lists its own cached book, which lags a price set through another process
        by up to its cache TTL. Refreshes balanced over several quota processes would otherwise flap
        between the new price and the old one (or none: the exact path)."""
        listing = await call(self._stub.ListPrices, ListPricesRequest(), timeout=self._timeout)
        prices = dict(self._prices)
        for message in listing.prices:
            price = price_from_message(message)
            known = prices.get(price.model)
            if known is None or price.price_id > known.price_id:
                prices[price.model] = price
        self._prices = prices

    async def _load(self) -> None:
        try:
            await self.refresh()
        except GatewayError as exc:
            now = time.monotonic()
            if now - self._warned_at >= _WARN_EVERY_S:
                self._warned_at = now
                log.warning(
                    "price refresh failed; keeping the last known prices: %s",
                    exc.message,
                    extra={"models": len(self._prices)},
                )

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            await self._load()
