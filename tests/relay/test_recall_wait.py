"""An exact reserve on one relay waits for a lease another, slow relay must give back.

Real pieces: quota on the module's PostgreSQL and the session's broker; two lease books (two relay
processes' worth) in this loop. The holding relay polls its sync loop only every 0.8 s, as a relay
process starved of CPU does: giving a recalled lease back takes it two polls.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from devinfra.backing import BackingServices
from services.common.grpc import call
from services.common.ids import new_id
from services.common.pb.relaygate.auth.v1.auth_pb2 import Principal
from services.common.pb.relaygate.common.v1.types_pb2 import Limits
from services.common.pb.relaygate.quota.v1 import quota_pb2 as pb
from services.relay.meter.accounting import LeaseAdmission, Meter
from services.relay.meter.leasing import Leasing
from services.relay.meter.prices import PriceCache
from tests.db_fixtures import DbUrls
from tests.relay.test_leases import QUOTA_CREDIT, TERMS, exchange_for, funded_model, leased_key, served
from tests.relay.test_settle_retry import TIMEOUT, publishing, quota

if TYPE_CHECKING:
    from services.common.pb.relaygate.quota.v1.quota_pb2_grpc import QuotaServiceAsyncStub
    from services.relay.meter.publisher import EventPublisher

SLOW_POLL_S = 0.8


@asynccontextmanager
async def relay(
    stub: QuotaServiceAsyncStub, publisher: EventPublisher, *, poll_s: float
) -> AsyncIterator[tuple[Meter, Leasing]]:
    """One relay process's meter and leases, with the defaults the relay's app uses."""
    prices = PriceCache(stub, refresh_s=0.1, rpc_timeout_s=TIMEOUT)
    await prices.start()
    leasing = Leasing(stub, TERMS, poll_s=poll_s)
    leasing.start()
    meter = Meter(stub, publisher, rpc_timeout_s=TIMEOUT, leases=LeaseAdmission(leasing, prices))
    try:
        yield meter, leasing
    finally:
        await meter.close(timeout=5)
        await leasing.close()
        await prices.close()


async def test_a_reserve_waits_for_a_recalled_lease_as_long_as_a_slow_relay_takes(
    migrated_db: DbUrls, backing: BackingServices, tmp_path: Path
) -> None:
    async with (
        quota(migrated_db, **QUOTA_CREDIT) as (stub, _gate),
        publishing(backing, tmp_path) as publisher,
        relay(stub, publisher, poll_s=SLOW_POLL_S) as (holder, holder_leases),
        relay(stub, publisher, poll_s=0.02) as (waiter, _waiter_leases),
    ):
        price, user = await funded_model(stub, 100_000)
        key = Principal(key_id=new_id("key"), user_id=user)
        await leased_key(holder, holder_leases, key, price.model)
        [lease] = [lease for lease in holder_leases.book.leases() if lease.state == "open"]
        balance = await call(
            stub.GetBalance, pb.GetBalanceRequest(user_id=user, consistent=True), timeout=TIMEOUT
        )
        # More than is free beside the lease, less than the balance: only the lease's unused part covers it.
        wanted = balance.available_micros + (lease.granted - lease.used) // 2
        assert wanted > balance.available_micros

        # Another key of the same user, exact (a rate limit), on the other relay.
        exact = exchange_for(
            Principal(key_id=new_id("key"), user_id=user, key_limits=Limits(rpm=1_000)), price.model
        )
        started = time.monotonic()
        await waiter.reserve(exact, prompt_tokens=wanted - 1, max_output_tokens=1)
        waited = time.monotonic() - started

        assert exact.reservation is not None and exact.reservation.reserved_micros == wanted
        assert lease.state == "closing"
        # It did wait for the slow relay (a poll to learn of the recall, one to report the lease closed).
        assert waited > SLOW_POLL_S / 2, waited
        # The key on the slow relay goes on, exact, while the balance allows.
        after = exchange_for(key, price.model)
        await served(holder, after)
        assert not after.lease_id
