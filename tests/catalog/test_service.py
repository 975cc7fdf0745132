"""CatalogService over gRPC, hosted by the quota process on quota's own port (``services.quota.app``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.errors import InvalidRequest
from services.common.grpc import call
from services.common.pb.relaygate.catalog.v1 import catalog_pb2 as pb
from services.common.pb.relaygate.catalog.v1 import catalog_pb2_grpc
from services.common.pb.relaygate.quota.v1 import quota_pb2, quota_pb2_grpc
from services.common.tls import QUOTA
from services.quota.app import run
from services.quota.settings import QuotaSettings
from services.relay.edge.http.app import open_gateway
from services.relay.settings import RelaySettings
from tests.db_fixtures import DbUrls
from tests.tls import client, tls_dir

TIMEOUT = 5.0


@asynccontextmanager
async def quota_process(urls: DbUrls) -> AsyncIterator[tuple[grpc.aio.Channel, str]]:
    """Quota's server in-process on a free port; yields one client channel to it and its address."""
    settings = QuotaSettings.model_validate(
        {
            "database_url": urls.primary,
            "database_replica_urls": [urls.replica],
            "quota_listen": "127.0.0.1:0",
            "grpc_tls_dir": tls_dir("quota"),
            "grpc_drain_seconds": 0.5,
        }
    )
    stop = asyncio.Event()
    port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    server = asyncio.create_task(run(settings, stop=stop, on_started=port.set_result))
    try:
        started: set[asyncio.Future[Any]] = {server, port}
        done, _ = await asyncio.wait(started, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        if server in done:
            server.result()  # surfaces a startup failure
        address = f"127.0.0.1:{await port}"
        async with client(address, QUOTA) as chan:
            yield chan, address
    finally:
        stop.set()
        await asyncio.wait_for(server, timeout=10)


async def test_channels_over_grpc(migrated_db: DbUrls) -> None:
    async with quota_process(migrated_db) as (chan, _):
        stub = catalog_pb2_grpc.CatalogServiceStub(chan)
        created = await call(
            stub.UpsertChannel,
            pb.Channel(
                name="local", base_url="http://127.0.0.1:9/v1", models=["grpc-model"], weight=1, enabled=True
            ),
            timeout=TIMEOUT,
        )
        assert created.channel_id.startswith("ch_")
        with pytest.raises(InvalidRequest):
            await call(stub.UpsertChannel, pb.Channel(name="bad", base_url="nope", weight=1), timeout=TIMEOUT)

        deadline = time.monotonic() + 5
        while True:  # the listing reads a replica; it shows the channel once the replica replays it
            listing = await call(stub.ListChannels, pb.ListChannelsRequest(), timeout=TIMEOUT)
            if created in listing.channels or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
        assert created in listing.channels
        polled = await call(
            stub.ListChannels, pb.ListChannelsRequest(known_revision=listing.revision), timeout=TIMEOUT
        )
        assert polled.unchanged and not polled.channels

        deleted = await call(
            stub.DeleteChannel, pb.DeleteChannelRequest(channel_id=created.channel_id), timeout=TIMEOUT
        )
        assert deleted.deleted


async def test_quota_and_the_catalog_share_one_port(migrated_db: DbUrls) -> None:
    # One deployment needs no change: RELAYGATE_CATALOG_ADDR defaults to quota's address, so both
    # services must answer there, and each is reported serving by the standard health check.
    async with quota_process(migrated_db) as (chan, _):
        prices = await call(
            quota_pb2_grpc.QuotaServiceStub(chan).ListPrices, quota_pb2.ListPricesRequest(), timeout=TIMEOUT
        )
        listing = await call(
            catalog_pb2_grpc.CatalogServiceStub(chan).ListChannels,
            pb.ListChannelsRequest(consistent=True),
            timeout=TIMEOUT,
        )
        assert prices is not None and listing.revision >= 0
        health = health_pb2_grpc.HealthStub(chan)
        for service in ("relaygate.quota.v1.QuotaService", "relaygate.catalog.v1.CatalogService"):
            status = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
            assert status.status == health_pb2.HealthCheckResponse.SERVING


async def test_the_relay_reads_channels_from_the_catalog_address(migrated_db: DbUrls, tmp_path: Path) -> None:
    async with quota_process(migrated_db) as (chan, address):
        created = await call(
            catalog_pb2_grpc.CatalogServiceStub(chan).UpsertChannel,
            pb.Channel(name="addr", base_url="http://127.0.0.1:9/v1", models=["addr-model"], enabled=True),
            timeout=TIMEOUT,
        )
        # Nothing listens on the quota address given: the channels can only come from catalog_addr.
        settings = RelaySettings(
            quota_addr="127.0.0.1:9",
            catalog_addr=address,
            events_enabled=False,
            redis_url="",
            event_spool_dir=str(tmp_path),
            grpc_tls_dir=tls_dir("relay"),
        )
        async with open_gateway(settings) as gateway:
            await gateway.channels.refresh(consistent=True)
            assert [c.id for c in gateway.channels.table.candidates("addr-model")] == [created.channel_id]


def test_the_catalog_address_defaults_to_quotas() -> None:
    assert RelaySettings(quota_addr="10.0.0.1:50052").catalog_address == "10.0.0.1:50052"
    settings = RelaySettings(quota_addr="10.0.0.1:50052", catalog_addr="10.0.0.2:50054")
    assert settings.catalog_address == "10.0.0.2:50054"
