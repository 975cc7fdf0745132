"""QuotaService end to end: the real gRPC server from ``app.run`` and a client using ``common.grpc.call``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
from pydantic import ValidationError

from services.common.errors import InsufficientQuota, InvalidRequest, ModelNotFound, NotFound
from services.common.grpc import call, channel
from services.common.ids import new_id
from services.common.pb.relaygate.common.v1 import types_pb2
from services.common.pb.relaygate.quota.v1 import quota_pb2 as pb
from services.common.pb.relaygate.quota.v1 import quota_pb2_grpc
from services.quota.app import run
from services.quota.settings import QuotaSettings
from tests.db_fixtures import DbUrls

TIMEOUT = 5.0


def _settings(urls: DbUrls, **overrides: object) -> QuotaSettings:
    values: dict[str, object] = {
        "database_url": urls.primary,
        "database_replica_urls": [urls.replica],
        "quota_listen": "127.0.0.1:0",
        "grpc_drain_seconds": 0.5,
        **overrides,
    }
    return QuotaSettings.model_validate(values)


@asynccontextmanager
async def serving(settings: QuotaSettings) -> AsyncIterator[quota_pb2_grpc.QuotaServiceAsyncStub]:
    """Run the service in-process on a free port and yield a client stub; stop and drain on exit."""
    stop = asyncio.Event()
    port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    server = asyncio.create_task(run(settings, stop=stop, on_started=port.set_result))
    try:
        started: set[asyncio.Future[Any]] = {server, port}
        done, _ = await asyncio.wait(started, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        if server in done:
            server.result()  # surfaces a startup failure
        async with channel(f"127.0.0.1:{await port}") as chan:
            yield quota_pb2_grpc.QuotaServiceStub(chan)
    finally:
        stop.set()
        await asyncio.wait_for(server, timeout=10)


async def test_reserve_settle_and_refusals_over_grpc(migrated_db: DbUrls) -> None:
    user = new_id("u")
    async with serving(_settings(migrated_db)) as stub:
        price = await call(
            stub.SetPrice,
            pb.Price(
                model="grpc-model", input_per_mtok=1_000_000, output_per_mtok=2_000_000, per_request=100
            ),
            timeout=TIMEOUT,
        )
        assert price.price_id > 0
        listed = await call(stub.ListPrices, pb.ListPricesRequest(), timeout=TIMEOUT)
        assert price in listed.prices
        topped = await call(
            stub.TopUp,
            pb.TopUpRequest(
                user_id=user, amount_micros=5_000, reason="grpc test", idempotency_key=new_id("tu")
            ),
            timeout=TIMEOUT,
        )
        assert (topped.balance_micros, topped.available_micros) == (5_000, 5_000)

        rid = new_id("rsv")
        reserve = pb.ReserveRequest(
            reservation_id=rid,
            user_id=user,
            key_id="k_1",
            model="grpc-model",
            prompt_tokens=1000,
            max_output_tokens=1000,
        )
        held = await call(stub.Reserve, reserve, timeout=TIMEOUT)
        assert (held.reserved_micros, held.available_micros, held.price.price_id) == (
            3_100,
            1_900,
            price.price_id,
        )
        assert held.expires_at > time.time()

        # Holds 3,100 of 5,000: the next request of the same size does not fit, and the client gets
        # the domain exception back, not a bare RpcError.
        with pytest.raises(InsufficientQuota, match="needs 3100 micro-units but only 1900"):
            await call(
                stub.Reserve,
                _copy(reserve, reservation_id=new_id("rsv")),
                timeout=TIMEOUT,
            )
        with pytest.raises(ModelNotFound):
            await call(
                stub.Reserve,
                pb.ReserveRequest(reservation_id=new_id("rsv"), user_id=user, model="nope"),
                timeout=TIMEOUT,
            )

        usage = types_pb2.Usage(prompt_tokens=1000, completion_tokens=100)
        settled = await call(stub.Settle, pb.SettleRequest(reservation_id=rid, usage=usage), timeout=TIMEOUT)
        assert (settled.state, settled.charged_micros, settled.reserved_micros, settled.repeated) == (
            "settled",
            1_300,
            3_100,
            False,
        )
        again = await call(stub.Settle, pb.SettleRequest(reservation_id=rid, usage=usage), timeout=TIMEOUT)
        released = await call(
            stub.Release, pb.ReleaseRequest(reservation_id=rid, reason="late"), timeout=TIMEOUT
        )
        assert again.repeated and released.repeated
        assert released.charged_micros == 1_300

        balance = await call(
            stub.GetBalance, pb.GetBalanceRequest(user_id=user, consistent=True), timeout=TIMEOUT
        )
        assert (balance.balance_micros, balance.reserved_micros, balance.available_micros) == (
            3_700,
            0,
            3_700,
        )

        with pytest.raises(NotFound):
            await call(stub.Settle, pb.SettleRequest(reservation_id="rsv_unknown"), timeout=TIMEOUT)
        # The status code itself is right for clients that do not use `call`.
        with pytest.raises(grpc.aio.AioRpcError) as raw:
            await stub.Reserve(_copy(reserve, reservation_id=new_id("rsv"), prompt_tokens=10**9))
        assert raw.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def _copy(request: pb.ReserveRequest, *, reservation_id: str, prompt_tokens: int = 0) -> pb.ReserveRequest:
    copy = pb.ReserveRequest()
    copy.CopyFrom(request)
    copy.reservation_id = reservation_id
    copy.prompt_tokens = prompt_tokens or request.prompt_tokens
    return copy


async def test_channels_over_grpc(migrated_db: DbUrls) -> None:
    async with serving(_settings(migrated_db)) as stub:
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


async def test_sweeper_in_run_expires_an_abandoned_hold(migrated_db: DbUrls) -> None:
    user = new_id("u")
    settings = _settings(migrated_db, reservation_ttl_s=1, expiry_sweep_interval_s=0.1)
    async with serving(settings) as stub:
        await call(stub.SetPrice, pb.Price(model="sweep-model", per_request=700), timeout=TIMEOUT)
        await call(stub.TopUp, pb.TopUpRequest(user_id=user, amount_micros=1_000), timeout=TIMEOUT)
        rid = new_id("rsv")
        await call(
            stub.Reserve,
            pb.ReserveRequest(reservation_id=rid, user_id=user, model="sweep-model"),
            timeout=TIMEOUT,
        )

        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            balance = await call(
                stub.GetBalance, pb.GetBalanceRequest(user_id=user, consistent=True), timeout=TIMEOUT
            )
            if balance.reserved_micros == 0:
                break
            await asyncio.sleep(0.05)

        assert (balance.balance_micros, balance.reserved_micros) == (300, 0)
        late = await call(stub.Settle, pb.SettleRequest(reservation_id=rid), timeout=TIMEOUT)
        assert (late.state, late.charged_micros, late.repeated) == ("expired", 700, True)


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"reservation_ttl_s": 10, "expiry_sweep_interval_s": 20}, id="sweep slower than TTL"),
        pytest.param({"environment": "prod", "reservation_ttl_s": 30}, id="prod with a TTL under a minute"),
        pytest.param({"reservation_ttl_s": 0}, id="zero TTL"),
    ],
)
def test_unsafe_settings_are_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        QuotaSettings.model_validate({"database_url": "postgresql://quota@127.0.0.1/quota", **overrides})
