"""The price book: versions of each model's price, stored on the primary and cached in process. The
cost arithmetic itself is :mod:`services.common.pricing` (re-exported here), shared with the relays.

A price change inserts a new row and never rewrites an old one. The *current* price of a model is its
newest row; every hold and every charge records the id of the row it used, so a settle charges at the
price the request was reserved at, even when the price changed in between.
"""

from __future__ import annotations

import asyncio
import dataclasses

from sqlalchemy import func, insert, select

from services.common.clock import Clock
from services.common.db import Database
from services.common.errors import InvalidRequest, ModelNotFound
from services.common.pricing import (
    DEFAULT_MAX_OUTPUT_TOKENS,
    MAX_CHOICES,
    MAX_IMAGES,
    MAX_PRICE_MICROS,
    MAX_TOKENS,
    RATE_FIELDS,
    Price,
    Usage,
    cost,
    worst_case,
)
from services.quota import models

__all__ = [
    "DEFAULT_MAX_OUTPUT_TOKENS",
    "MAX_CHOICES",
    "MAX_IMAGES",
    "MAX_PRICE_MICROS",
    "MAX_TOKENS",
    "Price",
    "PriceBook",
    "Usage",
    "cost",
    "validate_price",
    "worst_case",
]

_MODEL_NAME_MAX = 200
# Versions of one model's price listed at most (an operator's price changes: a handful a year).
HISTORY_LIMIT = 1000


def validate_price(price: Price) -> Price:
    """Check a price before it is stored; returns it with the default output cap filled in."""
    model = price.model.strip()
    if not model:
        raise InvalidRequest("a price needs a model name", param="model")
    if len(model) > _MODEL_NAME_MAX:
        raise InvalidRequest(f"model name longer than {_MODEL_NAME_MAX} characters", param="model")
    for name in RATE_FIELDS:
        value: int = getattr(price, name)
        if not 0 <= value <= MAX_PRICE_MICROS:
            raise InvalidRequest(f"{name} must be between 0 and {MAX_PRICE_MICROS} (got {value})", param=name)
    cap = price.default_max_output_tokens
    if not 0 <= cap <= MAX_TOKENS:
        raise InvalidRequest(
            f"default_max_output_tokens must be between 0 and {MAX_TOKENS} (got {cap})",
            param="default_max_output_tokens",
        )
    return Price(
        model=model,
        input_per_mtok=price.input_per_mtok,
        output_per_mtok=price.output_per_mtok,
        cached_input_per_mtok=price.cached_input_per_mtok,
        cache_write_per_mtok=price.cache_write_per_mtok,
        reasoning_per_mtok=price.reasoning_per_mtok,
        per_request=price.per_request,
        per_image=price.per_image,
        # 0 is what an omitted protobuf field reads as; a zero cap would reserve nothing for the output.
        default_max_output_tokens=cap or DEFAULT_MAX_OUTPUT_TOKENS,
    )


def _from_row(row: models.Price) -> Price:
    return Price(
        model=row.model,
        input_per_mtok=row.input_per_mtok,
        output_per_mtok=row.output_per_mtok,
        cached_input_per_mtok=row.cached_input_per_mtok,
        cache_write_per_mtok=row.cache_write_per_mtok,
        reasoning_per_mtok=row.reasoning_per_mtok,
        per_request=row.per_request,
        per_image=row.per_image,
        default_max_output_tokens=row.default_max_output_tokens,
        price_id=row.id,
        created_at=row.created_at,
    )


class PriceBook:
    """Current prices per model, cached in process for ``cache_ttl_s``; any version by id, cached forever.

    A price set through this book is visible to it at once; prices set by another quota process take
    effect here within ``cache_ttl_s``. Loads read the primary: they are one small query per TTL, and
    a lagging replica must neither hide a new model nor miss a price id that a hold already refers to.
    """

    def __init__(self, db: Database, *, clock: Clock, cache_ttl_s: float) -> None:
        self._db = db
        self._clock = clock
        self._ttl = cache_ttl_s
        self._current: dict[str, Price] = {}
        self._loaded_at: float | None = None
        # Bumped by every local price change, so a reload that started before it cannot mark the
        # older snapshot fresh.
        self._generation = 0
        self._by_id: dict[int, Price] = {}
        self._lock = asyncio.Lock()
        # Reloads started so far.
        self._reloads = 0

    async def current(self, model: str) -> Price:
        """The newest price of ``model``; :class:`ModelNotFound` when it has none.

        A model missing from the cached book reloads it first, so a model just priced through
        another quota process is served at once rather than after the TTL. Concurrent misses share
        one reload.
        """
        book = await self._book()
        price = book.get(model)
        if price is None:
            # Any reload that starts after this point will do, ours or a concurrent one.
            wanted = self._reloads + 1
            async with self._lock:
                if self._reloads < wanted:
                    await self._reload()
            price = self._current.get(model)
        if price is None:
            raise ModelNotFound(f"no price is configured for model {model!r}", param="model")
        return price

    async def list_current(self) -> list[Price]:
        """The current price of every priced model, sorted by model name."""
        book = await self._book()
        return [book[name] for name in sorted(book)]

    async def history(self, model: str) -> list[Price]:
        """Every version of ``model``'s price, newest first (none for a model never priced)."""
        statement = select(models.Price).where(models.Price.model == model).order_by(models.Price.id.desc())
        async with self._db.reader(consistent=True) as session:
            rows = (await session.scalars(statement.limit(HISTORY_LIMIT))).all()
        return [_from_row(row) for row in rows]

    async def by_id(self, price_id: int) -> Price:
        """A price version by id (rows are immutable, so a hit is never stale)."""
        price = self._by_id.get(price_id)
        if price is not None:
            return price
        async with self._db.reader(consistent=True) as session:
            row = await session.get(models.Price, price_id)
        if row is None:
            raise ModelNotFound(f"price version {price_id} does not exist")
        price = _from_row(row)
        self._by_id[price_id] = price
        return price

    async def set_price(self, price: Price) -> Price:
        """Store a new version of a model's price and return it with its ``price_id``."""
        price = validate_price(price)
        now = int(self._clock.time())
        async with self._db.transaction() as session:
            result = await session.execute(
                insert(models.Price)
                .values(
                    model=price.model,
                    input_per_mtok=price.input_per_mtok,
                    output_per_mtok=price.output_per_mtok,
                    cached_input_per_mtok=price.cached_input_per_mtok,
                    cache_write_per_mtok=price.cache_write_per_mtok,
                    reasoning_per_mtok=price.reasoning_per_mtok,
                    per_request=price.per_request,
                    per_image=price.per_image,
                    default_max_output_tokens=price.default_max_output_tokens,
                    created_at=now,
                )
                .returning(models.Price.id)
            )
            new_id = int(result.scalar_one())
        stored = dataclasses.replace(price, price_id=new_id, created_at=now)
        self._by_id[new_id] = stored
        # Reload on next use rather than patching the map: another process may have set a newer row.
        self._generation += 1
        self._loaded_at = None
        return stored

    async def _book(self) -> dict[str, Price]:
        if self._fresh():
            return self._current
        async with self._lock:
            # Another task may have reloaded while this one waited for the lock.
            if not self._fresh():
                await self._reload()
        return self._current

    def _fresh(self) -> bool:
        return self._loaded_at is not None and self._clock.monotonic() - self._loaded_at < self._ttl

    async def _reload(self) -> None:
        self._reloads += 1
        generation = self._generation
        started = self._clock.monotonic()
        newest = select(func.max(models.Price.id)).group_by(models.Price.model)
        async with self._db.reader(consistent=True) as session:
            rows = (await session.scalars(select(models.Price).where(models.Price.id.in_(newest)))).all()
        current = {row.model: _from_row(row) for row in rows}
        for price in current.values():
            self._by_id.setdefault(price.price_id, price)
        self._current = current
        self._loaded_at = started if generation == self._generation else None
