"""Sync over gRPC, and the exact Reserve answering CreditRecalled across the wire."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.common.errors import CreditRecalled, InvalidRequest
from services.common.grpc import call
from services.common.ids import new_id
from services.common.pb.relaygate.quota.v1 import quota_pb2 as pb
from services.quota.settings import QuotaSettings
from tests.db_fixtures import DbUrls
from tests.quota.test_service import serving
from tests.tls import tls_dir

TIMEOUT = 5.0


def _settings(urls: DbUrls) -> QuotaSettings:
    return QuotaSettings.model_validate(
        {
            "database_url": urls.primary,
            "database_replica_urls": [urls.replica],
            "quota_listen": "127.0.0.1:0",
            "grpc_tls_dir": tls_dir("quota"),
            "grpc_drain_seconds": 0.5,
            "credit_sync_interval_ms": 500,
        }
    )


async def test_sync_grants_a_lease_and_a_reserve_it_could_cover_is_told_to_retry(migrated_db: DbUrls) -> None:
    user, lease_id = new_id("u"), new_id("lse")
    async with serving(_settings(migrated_db)) as stub:
        await call(stub.TopUp, pb.TopUpRequest(user_id=user, amount_micros=300_000), timeout=TIMEOUT)
        await call(
            stub.SetPrice,
            pb.Price(model="lease-model", input_per_mtok=0, output_per_mtok=0, per_request=200_000),
            timeout=TIMEOUT,
        )
        await call(
            stub.SetBudget,
            pb.SetBudgetRequest(scope="key", scope_id="k_lease", period="day", limit_micros=10_000_000),
            timeout=TIMEOUT,
        )
        ask = pb.LeaseAsk(
            lease_id=lease_id, key_id="k_lease", user_id=user, want_micros=1_000_000, min_micros=1_000
        )
        answer = await call(stub.Sync, pb.SyncRequest(relay_id="relay-a", seq=1, asks=[ask]), timeout=TIMEOUT)
        assert [(g.lease_id, g.state, g.granted_micros) for g in answer.grants] == [
            (lease_id, "open", 150_000)
        ]
        # The lease holds against the key's budget as stored in quota (the ask carries no budget).
        budgets = await call(
            stub.GetBudgets,
            pb.GetBudgetsRequest(scope="key", scope_id="k_lease", consistent=True),
            timeout=TIMEOUT,
        )
        assert [(b.period, b.reserved_micros) for b in budgets.budgets] == [("day", 150_000), ("month", 0)]

        reserve = pb.ReserveRequest(reservation_id=new_id("rsv"), user_id=user, model="lease-model")
        with pytest.raises(CreditRecalled) as refused:
            await call(stub.Reserve, reserve, timeout=TIMEOUT)
        assert refused.value.retry_after == pytest.approx(1.0)

        closing = pb.LeaseReport(lease_id=lease_id, closing=True)
        answer = await call(
            stub.Sync, pb.SyncRequest(relay_id="relay-a", seq=2, reports=[closing]), timeout=TIMEOUT
        )
        assert [g.state for g in answer.grants] == ["closed"]
        held = await call(stub.Reserve, reserve, timeout=TIMEOUT)
        assert held.reserved_micros == 200_000

        with pytest.raises(InvalidRequest):
            await call(stub.Sync, pb.SyncRequest(relay_id="", seq=3), timeout=TIMEOUT)
        bad = pb.LeaseReport(lease_id=lease_id, used_micros=-1)
        with pytest.raises(InvalidRequest):
            await call(stub.Sync, pb.SyncRequest(relay_id="relay-a", seq=3, reports=[bad]), timeout=TIMEOUT)
        found = await call(stub.Reconcile, pb.ReconcileRequest(consistent=True), timeout=TIMEOUT)
        assert list(found.discrepancies) == []


async def test_the_sweeper_expires_a_lease_whose_relay_stopped_syncing(migrated_db: DbUrls) -> None:
    settings = _settings(migrated_db).model_copy(
        update={
            "credit_valid_for_ms": 1_000,
            "credit_grace_ms": 0,
            "credit_margin_ms": 0,
            "expiry_sweep_interval_s": 0.1,
        }
    )
    user = new_id("u")
    async with serving(settings) as stub:
        await call(stub.TopUp, pb.TopUpRequest(user_id=user, amount_micros=100_000), timeout=TIMEOUT)
        ask = pb.LeaseAsk(
            lease_id=new_id("lse"), key_id="k_sweep", user_id=user, want_micros=10_000, min_micros=100
        )
        answer = await call(
            stub.Sync, pb.SyncRequest(relay_id="relay-gone", seq=1, asks=[ask]), timeout=TIMEOUT
        )
        assert [g.state for g in answer.grants] == ["open"]
        balance = await call(
            stub.GetBalance, pb.GetBalanceRequest(user_id=user, consistent=True), timeout=TIMEOUT
        )
        assert balance.reserved_micros == 10_000
        deadline = time.monotonic() + 10
        while balance.reserved_micros and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            balance = await call(
                stub.GetBalance, pb.GetBalanceRequest(user_id=user, consistent=True), timeout=TIMEOUT
            )
        assert balance.reserved_micros == 0


async def test_sync_over_grpc_carries_scopes_and_the_budgeted_keys(migrated_db: DbUrls) -> None:
    user, budgeted = new_id("u"), new_id("k")
    async with serving(_settings(migrated_db)) as stub:
        await call(stub.TopUp, pb.TopUpRequest(user_id=user, amount_micros=1_000_000), timeout=TIMEOUT)
        await call(
            stub.SetBudget,
            pb.SetBudgetRequest(scope="key", scope_id=budgeted, period="day", limit_micros=50_000),
            timeout=TIMEOUT,
        )
        listed = await call(stub.Sync, pb.SyncRequest(relay_id="relay-a", seq=1), timeout=TIMEOUT)
        assert listed.HasField("budgeted_keys") and listed.budgeted_keys.complete
        assert budgeted in listed.budgeted_keys.key_ids
        version = listed.budgeted_keys.version

        shared = pb.LeaseAsk(
            lease_id=new_id("lse"),
            key_id=new_id("k"),
            user_id=user,
            want_micros=100_000,
            min_micros=1_000,
            scope="user",
        )
        refused = pb.LeaseAsk(
            lease_id=new_id("lse"),
            key_id=budgeted,
            user_id=user,
            want_micros=100_000,
            min_micros=1_000,
            scope="user",
        )
        answer = await call(
            stub.Sync,
            pb.SyncRequest(relay_id="relay-a", seq=2, asks=[shared, refused], budgeted_keys_version=version),
            timeout=TIMEOUT,
        )
        # The relay's list is current: it is not sent again.
        assert not answer.HasField("budgeted_keys")
        assert {g.lease_id: g.state for g in answer.grants} == {
            shared.lease_id: "open",
            refused.lease_id: "rescope",
        }
        listing = await call(
            stub.ListReservations,
            pb.ListReservationsRequest(user_id=user, consistent=True),
            timeout=TIMEOUT,
        )
        assert [(r.reservation_id, r.key_id) for r in listing.reservations] == [(shared.lease_id, "")]
        with pytest.raises(InvalidRequest):
            bad = pb.LeaseAsk(
                lease_id=new_id("lse"), key_id="k", user_id=user, want_micros=5, min_micros=1, scope="x"
            )
            await call(stub.Sync, pb.SyncRequest(relay_id="relay-a", seq=3, asks=[bad]), timeout=TIMEOUT)
