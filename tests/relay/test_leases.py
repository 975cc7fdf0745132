"""The relay's side of credit leases against a real quota: admission without an RPC, the usage event as
the charge, the exact path for limited keys, recalls, and leases given back on shutdown.

Real pieces: quota (``services.quota.app.run``) on the module's PostgreSQL, reached through a TCP gate
that plays the outage, and the relay's :class:`EventPublisher` on the session's broker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from devinfra.backing import BackingServices
from services.common import pricing
from services.common.credit import CreditTerms
from services.common.errors import ServiceUnavailable
from services.common.grpc import call
from services.common.ids import new_id
from services.common.pb.relaygate.auth.v1.auth_pb2 import Principal
from services.common.pb.relaygate.common.v1.types_pb2 import Limits, Usage
from services.common.pb.relaygate.quota.v1 import quota_pb2 as pb
from services.common.pb.relaygate.quota.v1.quota_pb2_grpc import QuotaServiceStub
from services.common.tls import QUOTA
from services.relay.meter.accounting import LeaseAdmission, Meter
from services.relay.meter.leasing import Leasing, sync_deadline_s
from services.relay.meter.prices import PriceCache
from services.relay.meter.record import Exchange
from tests.db_fixtures import DbUrls
from tests.relay.test_settle_retry import TIMEOUT, published, publishing, quota, settling_from
from tests.tls import client

if TYPE_CHECKING:
    from services.common.pb.relaygate.quota.v1.quota_pb2_grpc import QuotaServiceAsyncStub
    from services.relay.meter.publisher import EventPublisher

# One micro-unit per token, so costs read as token counts.
RATES = {"input_per_mtok": 1_000_000, "output_per_mtok": 1_000_000}
USAGE = Usage(prompt_tokens=40, completion_tokens=60)
SYNC_MS = 100
# Quota and the relay agree on the protocol's timing; short syncs keep the tests quick.
QUOTA_CREDIT = {"credit_sync_interval_ms": SYNC_MS, "credit_idle_ms": 60_000}
TERMS = CreditTerms(sync_interval_ms=SYNC_MS, idle_ms=60_000)


async def until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


@asynccontextmanager
async def leasing_meter(
    stub: QuotaServiceAsyncStub, publisher: EventPublisher, *, recall_window_s: float = 3 * SYNC_MS / 1000
) -> AsyncIterator[tuple[Meter, Leasing]]:
    prices = PriceCache(stub, refresh_s=0.1, rpc_timeout_s=TIMEOUT)
    await prices.start()
    leasing = Leasing(stub, TERMS, poll_s=0.02)
    leasing.start()
    meter = Meter(
        stub,
        publisher,
        rpc_timeout_s=TIMEOUT,
        leases=LeaseAdmission(leasing, prices, recall_window_s=recall_window_s),
    )
    try:
        yield meter, leasing
    finally:
        await meter.close(timeout=5)
        await leasing.close()
        await prices.close()


async def funded_model(stub: QuotaServiceAsyncStub, amount_micros: int) -> tuple[pb.Price, str]:
    model, user = new_id("lease-model"), new_id("u")
    price = await call(stub.SetPrice, pb.Price(model=model, **RATES), timeout=TIMEOUT)
    await call(stub.TopUp, pb.TopUpRequest(user_id=user, amount_micros=amount_micros), timeout=TIMEOUT)
    return price, user


def exchange_for(principal: Principal, model: str) -> Exchange:
    exchange = Exchange(request_id=new_id("req"), endpoint="chat.completions", client_ip="127.0.0.1")
    exchange.principal = principal
    exchange.model = model
    return exchange


async def served(meter: Meter, exchange: Exchange, *, max_output_tokens: int = 100) -> None:
    """Hold, then finish as a delivered answer with :data:`USAGE`."""
    await meter.reserve(exchange, prompt_tokens=40, max_output_tokens=max_output_tokens)
    exchange.usage = USAGE
    exchange.status_code = 200
    exchange.end_reason = "done"
    await meter.finish(exchange)


async def holds(stub: QuotaServiceAsyncStub, user: str) -> dict[str, pb.Reservation]:
    listing = await call(
        stub.ListReservations, pb.ListReservationsRequest(user_id=user, consistent=True), timeout=TIMEOUT
    )
    return {r.reservation_id: r for r in listing.reservations}


async def leased_key(meter: Meter, leasing: Leasing, principal: Principal, model: str) -> list[Exchange]:
    """Serve the key's requests until it has a lease (they are exact until then: the first asks for
    it, or the first once the relay has the model's price); returns those exact requests."""
    exact: list[Exchange] = []
    deadline = time.monotonic() + 10
    while not any(lease.state == "open" for lease in leasing.book.leases()):
        assert time.monotonic() < deadline, "timed out waiting for the key's lease to open"
        exchange = exchange_for(principal, model)
        await served(meter, exchange)
        assert exchange.reservation is not None and not exchange.lease_id
        exact.append(exchange)
        await asyncio.sleep(0.05)
    return exact


async def test_prices_are_cached_and_the_last_set_kept_while_quota_is_away(
    migrated_db: DbUrls,
) -> None:
    async with quota(migrated_db) as (stub, gate):
        first, _ = await funded_model(stub, 1)
        prices = PriceCache(stub, refresh_s=0.05, rpc_timeout_s=0.5)
        await prices.start()
        try:
            cached = prices.get(first.model)
            assert cached is not None and cached.price_id == first.price_id
            assert prices.get("never-priced") is None

            await gate.close()
            await asyncio.sleep(0.6)
            still = prices.get(first.model)
            assert still is not None and still.price_id == first.price_id
            await gate.open()

            # The stub's channel reconnects with a backoff once the gate is open again.
            deadline = time.monotonic() + 10
            while True:
                try:
                    newer = await call(
                        stub.SetPrice,
                        pb.Price(model=first.model, input_per_mtok=5, output_per_mtok=7),
                        timeout=TIMEOUT,
                    )
                    break
                except ServiceUnavailable:
                    assert time.monotonic() < deadline, "quota did not come back"
                    await asyncio.sleep(0.1)
            await until(
                lambda: (p := prices.get(first.model)) is not None and p.price_id == newer.price_id,
                "the new price version",
            )
            current = prices.get(first.model)
            assert current is not None and (current.input_per_mtok, current.output_per_mtok) == (5, 7)
        finally:
            await prices.close()


async def test_a_relay_balancing_over_quota_processes_keeps_the_newest_prices_any_of_them_listed(
    migrated_db: DbUrls,
) -> None:
    """A price set through one quota process reaches another's listing only once that one's cached
    book expires (``price_cache_ttl_s``). A relay refreshing its prices round robin over both must not
    take the stale listing for the truth: a model it saw priced stays priced, at its newest version
    (it flapped to the exact path, or back to the old version, every other refresh)."""
    async with (
        quota(migrated_db, price_cache_ttl_s=60) as (fresh, fresh_gate),
        quota(migrated_db, price_cache_ttl_s=60) as (stale, stale_gate),
    ):
        changed = await call(fresh.SetPrice, pb.Price(model=new_id("changed"), **RATES), timeout=TIMEOUT)
        # Both processes load their books now; for the next minute only ``fresh`` sees what follows.
        for stub in (fresh, stale):
            await call(stub.ListPrices, pb.ListPricesRequest(), timeout=TIMEOUT)
        newer = await call(
            fresh.SetPrice,
            pb.Price(model=changed.model, input_per_mtok=5, output_per_mtok=7),
            timeout=TIMEOUT,
        )
        priced = await call(fresh.SetPrice, pb.Price(model=new_id("priced"), **RATES), timeout=TIMEOUT)
        listed = await call(stale.ListPrices, pb.ListPricesRequest(), timeout=TIMEOUT)
        assert {p.model: p.price_id for p in listed.prices if p.model in (changed.model, priced.model)} == {
            changed.model: changed.price_id
        }, "the second quota process should still list its cached book"

        both = f"ipv4:///127.0.0.1:{fresh_gate.port},127.0.0.1:{stale_gate.port}"
        async with client(both, QUOTA) as chan:
            prices = PriceCache(QuotaServiceStub(chan), refresh_s=0.02, rpc_timeout_s=TIMEOUT)
            await prices.start()
            try:

                def versions() -> tuple[int, int]:
                    """The cached version of each model (0: not priced, the exact path)."""
                    first, second = prices.get(changed.model), prices.get(priced.model)
                    return (first.price_id if first else 0, second.price_id if second else 0)

                await until(lambda: versions() == (newer.price_id, priced.price_id), "the newest prices")
                # Twenty more refreshes, about half of them answered by the stale process.
                seen = set()
                for _ in range(20):
                    await asyncio.sleep(0.03)
                    seen.add(versions())
                assert seen == {(newer.price_id, priced.price_id)}
            finally:
                await prices.close()


async def test_a_key_with_a_rate_limit_stays_exact(
    migrated_db: DbUrls, backing: BackingServices, tmp_path: Path
) -> None:
    async with (
        publishing(backing, tmp_path) as publisher,
        quota(migrated_db, **QUOTA_CREDIT, **settling_from(publisher)) as (stub, _gate),
        leasing_meter(stub, publisher) as (meter, leasing),
    ):
        price, user = await funded_model(stub, 1_000_000)
        limited = Principal(key_id=new_id("key"), user_id=user, key_limits=Limits(rpm=1_000))
        for _ in range(3):
            exchange = exchange_for(limited, price.model)
            await served(meter, exchange)
            assert exchange.reservation is not None and not exchange.lease_id
            await asyncio.sleep(3 * SYNC_MS / 1000)
        # It never even asked for a lease.
        assert leasing.book.leases() == []
        # Each settled by its usage event.
        deadline = time.monotonic() + 20
        while any(r.state == "held" for r in (await holds(stub, user)).values()):
            assert time.monotonic() < deadline, "timed out waiting for the events to settle the holds"
            await asyncio.sleep(0.1)
        assert [r.state for r in (await holds(stub, user)).values()] == ["settled"] * 3


async def test_requests_after_the_first_are_admitted_on_the_lease_and_their_events_are_the_charge(
    migrated_db: DbUrls, backing: BackingServices, tmp_path: Path
) -> None:
    async with (
        quota(migrated_db, **QUOTA_CREDIT) as (stub, _gate),
        publishing(backing, tmp_path) as publisher,
        leasing_meter(stub, publisher) as (meter, leasing),
    ):
        price, user = await funded_model(stub, 10_000_000)
        principal = Principal(key_id=new_id("key"), user_id=user)
        exact = await leased_key(meter, leasing, principal, price.model)

        leased = [exchange_for(principal, price.model) for _ in range(5)]
        for exchange in leased:
            await served(meter, exchange)
        expected = pricing.cost(
            pricing.Price(model=price.model, **RATES), pricing.Usage(prompt_tokens=40, completion_tokens=60)
        )
        lease_ids = {exchange.lease_id for exchange in leased}
        assert len(lease_ids) == 1 and "" not in lease_ids
        assert all(exchange.reservation is None for exchange in leased)
        for exchange in leased:
            [event] = await published(publisher.settings, exchange.request_id)
            assert (event.lease_id, event.reservation_id) == (exchange.lease_id, "")
            assert (event.cost_micros, event.price_id) == (expected, price.price_id)

        # Quota saw a Reserve for the requests before the lease, and one lease: no hold for the others.
        found = await holds(stub, user)
        assert set(found) == {e.request_id for e in exact} | lease_ids
        [lease_id] = lease_ids
        assert found[lease_id].state == "held"

        # Shutdown gives the lease back: quota's hold shrinks to what was used.
        await leasing.close()
        lease = (await holds(stub, user))[lease_id]
        assert lease.reserved_micros + lease.charged_micros == expected * len(leased)


async def test_an_abandoned_admission_frees_its_share_and_charges_nothing(
    migrated_db: DbUrls, backing: BackingServices, tmp_path: Path
) -> None:
    async with (
        quota(migrated_db, **QUOTA_CREDIT) as (stub, _gate),
        publishing(backing, tmp_path) as publisher,
        leasing_meter(stub, publisher) as (meter, leasing),
    ):
        price, user = await funded_model(stub, 10_000_000)
        principal = Principal(key_id=new_id("key"), user_id=user)
        await leased_key(meter, leasing, principal, price.model)

        exchange = exchange_for(principal, price.model)
        await meter.reserve(exchange, prompt_tokens=40, max_output_tokens=100)
        lease = leasing.book.lease(exchange.lease_id)
        assert lease is not None and lease.inflight == 140
        meter.abandon(exchange)
        assert (lease.inflight, lease.used, exchange.charged_micros) == (0, 0, 0)
        # Finishing it later (a handler that still gets there) changes nothing.
        await meter.finish(exchange)
        assert (lease.inflight, lease.used) == (0, 0)


async def test_an_exact_reserve_waits_for_leases_quota_recalled(
    migrated_db: DbUrls, backing: BackingServices, tmp_path: Path
) -> None:
    async with (
        quota(migrated_db, **QUOTA_CREDIT) as (stub, _gate),
        publishing(backing, tmp_path) as publisher,
        leasing_meter(stub, publisher, recall_window_s=3.0) as (meter, leasing),
    ):
        price, user = await funded_model(stub, 100_000)
        leased = Principal(key_id=new_id("key"), user_id=user)
        await leased_key(meter, leasing, leased, price.model)
        for _ in range(20):
            await served(meter, exchange_for(leased, price.model))
        [lease] = [lease for lease in leasing.book.leases() if lease.state == "open"]
        balance = await call(
            stub.GetBalance, pb.GetBalanceRequest(user_id=user, consistent=True), timeout=TIMEOUT
        )
        # More than is free beside the lease, less than the balance: only the lease's unused part covers it.
        wanted = balance.available_micros + (lease.granted - lease.used) // 2
        assert wanted > balance.available_micros and wanted <= balance.balance_micros - lease.used

        # Another key of the same user, with a rate limit: exact.
        exact = exchange_for(
            Principal(key_id=new_id("key"), user_id=user, key_limits=Limits(rpm=1_000)), price.model
        )
        await meter.reserve(exact, prompt_tokens=wanted - 1, max_output_tokens=1)
        assert exact.reservation is not None and exact.reservation.reserved_micros == wanted
        # The recalled lease was closed and given back; the key asks for a new one later.
        assert lease.lease_id not in {
            open_.lease_id for open_ in leasing.book.leases() if open_.state == "open"
        }


def test_a_sync_may_outlast_its_interval_but_not_half_of_what_a_grant_admits() -> None:
    # The defaults: the request path's deadline.
    assert sync_deadline_s(CreditTerms(), rpc_timeout_s=2.0) == 2.0
    # Short grants (1.5 s of admitting): a sync stalled longer would keep the next from renewing them.
    short = CreditTerms(sync_interval_ms=200, valid_for_ms=2_000, margin_ms=500)
    assert sync_deadline_s(short, rpc_timeout_s=4.0) == 0.75
    # Never shorter than one interval.
    tight = CreditTerms(sync_interval_ms=1_000, valid_for_ms=2_500, margin_ms=2_000)
    assert sync_deadline_s(tight, rpc_timeout_s=4.0) == 1.0


async def test_rotating_keys_of_one_user_share_its_lease_and_a_budgeted_key_gets_its_own(
    migrated_db: DbUrls, backing: BackingServices, tmp_path: Path
) -> None:
    async with (
        quota(migrated_db, **QUOTA_CREDIT) as (stub, _gate),
        publishing(backing, tmp_path) as publisher,
        leasing_meter(stub, publisher) as (meter, leasing),
    ):
        price, user = await funded_model(stub, 10_000_000)
        budgeted = Principal(key_id=new_id("key"), user_id=user)
        await call(
            stub.SetBudget,
            pb.SetBudgetRequest(scope="key", scope_id=budgeted.key_id, period="day", limit_micros=5_000),
            timeout=TIMEOUT,
        )
        await until(
            lambda: (listed := leasing.book.budgeted) is not None and budgeted.key_id in listed.key_ids,
            "quota's list of budgeted keys",
        )
        first = Principal(key_id=new_id("key"), user_id=user)
        await leased_key(meter, leasing, first, price.model)
        [shared] = leasing.book.leases()
        assert shared.scope == f"user:{user}"

        # Twenty keys, each new to the relay, admitted on the user's lease without a Reserve (but for
        # a request that finds the lease low while its sync asks for more: it follows the user's rate).
        rotating = [
            exchange_for(Principal(key_id=new_id("key"), user_id=user), price.model) for _ in range(20)
        ]
        for exchange in rotating:
            await served(meter, exchange)
            await asyncio.sleep(SYNC_MS / 4000)
        leased = [e for e in rotating if e.lease_id]
        assert {e.lease_id for e in leased} == {shared.lease_id}
        assert len(leased) >= 16 and rotating[-1] in leased, [bool(e.lease_id) for e in rotating]
        # The usage event names the lease; the request keeps its own key.
        event = (await published(publisher.settings, rotating[-1].request_id))[0]
        assert rotating[-1].principal is not None
        assert (event.lease_id, event.key_id) == (shared.lease_id, rotating[-1].principal.key_id)

        # The budgeted key never rides the shared lease: exact, then (asked on its own rate) its own.
        mine = [exchange_for(budgeted, price.model) for _ in range(2)]
        for exchange in mine:
            await served(meter, exchange)
            assert exchange.lease_id != shared.lease_id
        await until(
            lambda: any(
                (lease.scope, lease.state) == (budgeted.key_id, "open") for lease in leasing.book.leases()
            ),
            "the budgeted key's own lease",
        )
        found = await holds(stub, user)
        opened = [lease for lease in leasing.book.leases() if lease.state == "open"]
        assert {found[lease.lease_id].key_id for lease in opened} == {"", budgeted.key_id}
