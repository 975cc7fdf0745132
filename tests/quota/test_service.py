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

from services.common.errors import BudgetExceeded, InsufficientQuota, InvalidRequest, ModelNotFound, NotFound
from services.common.grpc import call
from services.common.ids import new_id
from services.common.pb.relaygate.common.v1 import types_pb2
from services.common.pb.relaygate.quota.v1 import quota_pb2 as pb
from services.common.pb.relaygate.quota.v1 import quota_pb2_grpc
from services.common.tls import QUOTA
from services.quota.app import run
from services.quota.settings import QuotaSettings
from tests.db_fixtures import DbUrls
from tests.tls import client, tls_dir

TIMEOUT = 5.0


def _settings(urls: DbUrls, **overrides: object) -> QuotaSettings:
    values: dict[str, object] = {
        "database_url": urls.primary,
        "database_replica_urls": [urls.replica],
        "quota_listen": "127.0.0.1:0",
        "grpc_tls_dir": tls_dir("quota"),
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
        async with client(f"127.0.0.1:{await port}", QUOTA) as chan:
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


async def test_limits_budgets_and_reports_over_grpc(migrated_db: DbUrls) -> None:
    user, key = new_id("u"), new_id("k")
    async with serving(_settings(migrated_db)) as stub:
        await call(stub.SetPrice, pb.Price(model="report-model", per_request=1_000), timeout=TIMEOUT)
        await call(stub.TopUp, pb.TopUpRequest(user_id=user, amount_micros=100_000), timeout=TIMEOUT)
        budget = await call(
            stub.SetBudget,
            pb.SetBudgetRequest(scope="key", scope_id=key, period="month", limit_micros=4_000, actor="ops"),
            timeout=TIMEOUT,
        )
        assert (budget.limit_micros, budget.spent_micros, budget.resets_at > budget.window_start) == (
            4_000,
            0,
            True,
        )
        limits = types_pb2.Limits(rpm=10, tpm=50_000, max_concurrency=8)
        ids = [new_id("rsv") for _ in range(5)]
        answers = []
        for rid in ids:
            request = pb.ReserveRequest(
                reservation_id=rid,
                user_id=user,
                key_id=key,
                model="report-model",
                prompt_tokens=40,
                key_limits=limits,
            )
            try:
                answers.append(await call(stub.Reserve, request, timeout=TIMEOUT))
            except BudgetExceeded as exc:
                assert exc.param == "budgets.key.month"
        assert len(answers) == 4, "the fifth request does not fit the monthly budget of 4 requests"
        assert [a.requests.remaining for a in answers] == [9, 8, 7, 6]
        last = answers[-1]
        assert (last.tokens.limit, last.tokens.remaining) == (50_000, 50_000 - 4 * (40 + 4096))
        # The refused request gave its count back: with room in the budget again, the next one is 5th.
        await call(
            stub.SetBudget,
            pb.SetBudgetRequest(scope="key", scope_id=key, period="month", limit_micros=9_000),
            timeout=TIMEOUT,
        )
        extra = pb.ReserveRequest(
            reservation_id=ids[4],
            user_id=user,
            key_id=key,
            model="report-model",
            prompt_tokens=40,
            key_limits=limits,
        )
        assert (await call(stub.Reserve, extra, timeout=TIMEOUT)).requests.remaining == 5
        assert 60_000 <= last.requests.reset_ms <= 61_000
        await call(stub.Settle, pb.SettleRequest(reservation_id=ids[0]), timeout=TIMEOUT)
        await call(stub.Release, pb.ReleaseRequest(reservation_id=ids[1]), timeout=TIMEOUT)

        seen: list[pb.Reservation] = []
        cursor = ""
        while True:
            page = await call(
                stub.ListReservations,
                pb.ListReservationsRequest(user_id=user, limit=3, cursor=cursor, consistent=True),
                timeout=TIMEOUT,
            )
            seen += page.reservations
            if not page.next_cursor:
                break
            cursor = page.next_cursor
        assert sorted(r.reservation_id for r in seen) == sorted(ids)
        states = {r.reservation_id: (r.state, r.charged_micros) for r in seen}
        assert states[ids[0]] == ("settled", 1_000) and states[ids[1]] == ("released", 0)
        held = await call(
            stub.ListReservations,
            pb.ListReservationsRequest(user_id=user, state="held", consistent=True),
            timeout=TIMEOUT,
        )
        assert {r.reservation_id for r in held.reservations} == set(ids[2:])
        with pytest.raises(InvalidRequest):
            await call(
                stub.ListReservations,
                pb.ListReservationsRequest(user_id=user, cursor="junk"),
                timeout=TIMEOUT,
            )

        budgets = await call(
            stub.GetBudgets, pb.GetBudgetsRequest(scope="key", scope_id=key, consistent=True), timeout=TIMEOUT
        )
        month = next(b for b in budgets.budgets if b.period == "month")
        assert (month.limit_micros, month.spent_micros, month.reserved_micros) == (9_000, 1_000, 3_000)
        report = await call(stub.Reconcile, pb.ReconcileRequest(consistent=True), timeout=TIMEOUT)
        assert list(report.discrepancies) == []


def _copy(request: pb.ReserveRequest, *, reservation_id: str, prompt_tokens: int = 0) -> pb.ReserveRequest:
    copy = pb.ReserveRequest()
    copy.CopyFrom(request)
    copy.reservation_id = reservation_id
    copy.prompt_tokens = prompt_tokens or request.prompt_tokens
    return copy


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

        assert (balance.balance_micros, balance.reserved_micros) == (1_000, 0)
        late = await call(stub.Settle, pb.SettleRequest(reservation_id=rid), timeout=TIMEOUT)
        assert (late.state, late.charged_micros, late.repeated) == ("expired", 0, True)


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"reservation_ttl_s": 10, "expiry_sweep_interval_s": 20}, id="sweep slower than TTL"),
        pytest.param({"environment": "prod", "reservation_ttl_s": 30}, id="prod with a TTL under a minute"),
        pytest.param({"reservation_ttl_s": 0}, id="zero TTL"),
        pytest.param({"budget_timezone": "Nowhere/Atlantis"}, id="unknown budget time zone"),
        pytest.param({"ledger_batch_max": 0}, id="empty batches"),
    ],
)
def test_unsafe_settings_are_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        QuotaSettings.model_validate({"database_url": "postgresql://quota@127.0.0.1/quota", **overrides})
