"""A database outage under quota's queries is a 503 with Retry-After (gRPC UNAVAILABLE), never a 500.

The primary is reached through a TCP gate; closing it resets quota's pooled connections and refuses
new ones, as a primary that stopped would. Pricing, catalog, budget, balance and ledger queries
all answer :class:`ServiceUnavailable`, and quota serves again once the gate opens.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from services.common.errors import ServiceUnavailable
from services.common.grpc import call
from services.common.ids import new_id
from services.common.pb.relaygate.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from services.common.pb.relaygate.quota.v1 import quota_pb2 as pb
from services.common.pb.relaygate.quota.v1 import quota_pb2_grpc
from services.common.tls import QUOTA
from services.quota.app import run
from services.quota.settings import QuotaSettings
from tests.common.tcp_gate import TcpGate
from tests.db_fixtures import DbUrls
from tests.tls import client, tls_dir

if TYPE_CHECKING:
    from services.common.pb.relaygate.catalog.v1.catalog_pb2_grpc import CatalogServiceAsyncStub
    from services.common.pb.relaygate.quota.v1.quota_pb2_grpc import QuotaServiceAsyncStub as Stub

TIMEOUT = 5.0


@asynccontextmanager
async def serving(database_url: str) -> AsyncIterator[tuple[Stub, CatalogServiceAsyncStub]]:
    settings = QuotaSettings.model_validate(
        {
            "database_url": database_url,
            "quota_listen": "127.0.0.1:0",
            "grpc_tls_dir": tls_dir("quota"),
            "grpc_drain_seconds": 0.5,
            # Every price read goes to the database, so the outage is seen by pricing too.
            "price_cache_ttl_s": 0,
        }
    )
    stop = asyncio.Event()
    port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    server = asyncio.create_task(run(settings, stop=stop, on_started=port.set_result))
    try:
        starting: set[asyncio.Future[Any]] = {server, port}
        done, _ = await asyncio.wait(starting, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        if server in done:
            server.result()
        async with client(f"127.0.0.1:{await port}", QUOTA) as chan:
            # The catalog is hosted on quota's port and reads the same database.
            yield quota_pb2_grpc.QuotaServiceStub(chan), catalog_pb2_grpc.CatalogServiceStub(chan)
    finally:
        stop.set()
        await asyncio.wait_for(server, timeout=10)


def queries(
    stub: Stub, catalog: CatalogServiceAsyncStub, user: str, model: str
) -> dict[str, Callable[[], Awaitable[Any]]]:
    return {
        "pricing": lambda: call(stub.ListPrices, pb.ListPricesRequest(), timeout=TIMEOUT),
        "catalog": lambda: call(
            catalog.ListChannels, catalog_pb2.ListChannelsRequest(consistent=True), timeout=TIMEOUT
        ),
        "budget": lambda: call(
            stub.GetBudgets, pb.GetBudgetsRequest(scope="user", scope_id=user), timeout=TIMEOUT
        ),
        "balance": lambda: call(stub.GetBalance, pb.GetBalanceRequest(user_id=user), timeout=TIMEOUT),
        "reserve": lambda: call(
            stub.Reserve,
            pb.ReserveRequest(reservation_id=new_id("rsv"), user_id=user, model=model, prompt_tokens=10),
            timeout=TIMEOUT,
        ),
    }


async def test_a_primary_outage_is_503_with_retry_after_for_every_query(migrated_db: DbUrls) -> None:
    gate = TcpGate.for_url(migrated_db.primary)
    await gate.open()
    user, model = new_id("u"), new_id("outage-model")
    async with serving(gate.url(migrated_db.primary)) as (stub, catalog):
        await call(stub.SetPrice, pb.Price(model=model, per_request=100), timeout=TIMEOUT)
        await call(stub.TopUp, pb.TopUpRequest(user_id=user, amount_micros=10_000), timeout=TIMEOUT)
        for query in queries(stub, catalog, user, model).values():
            await query()

        await gate.close()
        try:
            for name, query in queries(stub, catalog, user, model).items():
                with pytest.raises(ServiceUnavailable) as caught:
                    await query()
                assert caught.value.status == 503, name
                assert caught.value.retry_after is not None and caught.value.retry_after > 0, name
            # The wire form: UNAVAILABLE with the gateway's own error code, not INTERNAL.
            with pytest.raises(grpc.aio.AioRpcError) as raw:
                await stub.ListPrices(pb.ListPricesRequest(), timeout=TIMEOUT)
            assert raw.value.code() is grpc.StatusCode.UNAVAILABLE
        finally:
            await gate.open()

        deadline = time.monotonic() + 10
        while True:
            try:
                for query in queries(stub, catalog, user, model).values():
                    await query()
                break
            except ServiceUnavailable:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
    await gate.close()
