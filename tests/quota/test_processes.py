"""The invariants under concurrent traffic through two real quota processes sharing PostgreSQL and Redis.

Every test sends its requests over gRPC to separate ``python -m services.quota`` processes, so nothing
is shared in memory: whatever holds, holds across replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from redis.asyncio import Redis
from sqlalchemy import text

from devinfra.backing import BackingServices
from devinfra.postgres import psql
from services.common.db import Database
from services.common.errors import (
    BudgetExceeded,
    ConcurrencyLimited,
    Conflict,
    GatewayError,
    InsufficientQuota,
    RateLimited,
    ServiceUnavailable,
)
from services.common.grpc import call
from services.common.ids import new_id
from services.common.pb.relaygate.common.v1 import types_pb2
from services.common.pb.relaygate.quota.v1 import quota_pb2 as pb
from services.quota.redis_limits import PREFIX
from tests.db_fixtures import DbUrls
from tests.quota.processes import REPO, QuotaProcess, quota_processes, stubs

if TYPE_CHECKING:
    from services.common.pb.relaygate.quota.v1.quota_pb2_grpc import QuotaServiceAsyncStub

TIMEOUT = 10.0
# 100 prompt tokens at 1 unit/Mtok + 200 output tokens at 2 units/Mtok: every hold is 500 micro-units.
HOLD = 500
RATES = {"input_per_mtok": 1_000_000, "output_per_mtok": 2_000_000}
FULL_USAGE = types_pb2.Usage(prompt_tokens=100, completion_tokens=200)


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("quota-processes")


@pytest.fixture(scope="module")
def pair(
    backing: BackingServices, migrated_db: DbUrls, log_dir: Path
) -> Iterator[tuple[QuotaProcess, QuotaProcess]]:
    """Two quota processes on the module's database and the session's Redis."""
    with quota_processes(backing, migrated_db, log_dir) as processes:
        yield processes.start("a"), processes.start("b")


@pytest.fixture
async def clients(pair: tuple[QuotaProcess, QuotaProcess]) -> AsyncIterator[list[QuotaServiceAsyncStub]]:
    async with stubs(*pair) as found:
        yield found


@pytest.fixture
async def primary(migrated_db: DbUrls) -> AsyncIterator[Database]:
    db = Database(migrated_db.settings(database_replica_urls=[]))
    await db.start()
    try:
        yield db
    finally:
        await db.close()


async def priced(stub: QuotaServiceAsyncStub) -> str:
    model = new_id("model")
    await call(stub.SetPrice, pb.Price(model=model, **RATES), timeout=TIMEOUT)
    return model


async def funded(stub: QuotaServiceAsyncStub, amount: int) -> str:
    user = new_id("u")
    await call(
        stub.TopUp, pb.TopUpRequest(user_id=user, amount_micros=amount, reason="test"), timeout=TIMEOUT
    )
    return user


def reserve_request(
    rid: str,
    user: str,
    model: str,
    *,
    key: str = "",
    key_limits: types_pb2.Limits | None = None,
    user_limits: types_pb2.Limits | None = None,
) -> pb.ReserveRequest:
    return pb.ReserveRequest(
        reservation_id=rid,
        user_id=user,
        key_id=key,
        model=model,
        prompt_tokens=100,
        max_output_tokens=200,
        key_limits=key_limits,
        user_limits=user_limits,
    )


async def reserve_all(
    clients: list[QuotaServiceAsyncStub], requests: list[pb.ReserveRequest]
) -> list[pb.ReserveResponse | BaseException]:
    """All requests at once, alternating between the processes."""
    return await asyncio.gather(
        *(call(clients[i % len(clients)].Reserve, r, timeout=TIMEOUT) for i, r in enumerate(requests)),
        return_exceptions=True,
    )


def split(
    results: list[pb.ReserveResponse | BaseException],
) -> tuple[list[pb.ReserveResponse], list[BaseException]]:
    held = [r for r in results if isinstance(r, pb.ReserveResponse)]
    refused = [r for r in results if isinstance(r, BaseException)]
    return held, refused


async def settle_all(
    clients: list[QuotaServiceAsyncStub], held: list[pb.ReserveResponse]
) -> list[pb.SettleResponse]:
    return await asyncio.gather(
        *(
            call(
                clients[(i + 1) % len(clients)].Settle,
                pb.SettleRequest(reservation_id=h.reservation_id, usage=FULL_USAGE),
                timeout=TIMEOUT,
            )
            for i, h in enumerate(held)
        )
    )


async def books_agree(stub: QuotaServiceAsyncStub) -> None:
    report = await call(stub.Reconcile, pb.ReconcileRequest(consistent=True), timeout=TIMEOUT)
    assert list(report.discrepancies) == []


@contextlib.asynccontextmanager
async def sampling(db: Database, user: str, seen: list[tuple[int, int]]) -> AsyncIterator[None]:
    """Samples the user's account on the primary until the block ends."""
    done = asyncio.Event()

    async def watch() -> None:
        while not done.is_set():
            seen.append(await _account(db, user))

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        done.set()
        await watcher


async def _account(db: Database, user: str) -> tuple[int, int]:
    async with db.reader(consistent=True) as session:
        row = (
            await session.execute(
                text("SELECT balance_micros, reserved_micros FROM accounts WHERE user_id = :u"), {"u": user}
            )
        ).one()
    return int(row[0]), int(row[1])


# -- exactly N of 200 ------------------------------------------------------------------------------------


async def test_balance_worth_150_holds_admits_exactly_150_of_200(
    clients: list[QuotaServiceAsyncStub], primary: Database
) -> None:
    model = await priced(clients[0])
    user = await funded(clients[0], 150 * HOLD)
    seen: list[tuple[int, int]] = []

    async with sampling(primary, user, seen):
        held, refused = split(
            await reserve_all(clients, [reserve_request(new_id("rsv"), user, model) for _ in range(200)])
        )
        assert (len(held), len(refused)) == (150, 50)
        assert all(isinstance(exc, InsufficientQuota) for exc in refused), refused[:3]
        settled = await settle_all(clients, held)

    assert {(s.state, s.charged_micros, s.repeated) for s in settled} == {("settled", HOLD, False)}
    balance = await call(
        clients[1].GetBalance, pb.GetBalanceRequest(user_id=user, consistent=True), timeout=TIMEOUT
    )
    assert (balance.balance_micros, balance.reserved_micros, balance.available_micros) == (0, 0, 0)
    assert len(seen) > 5, "the watcher sampled the account while the requests ran"
    assert all(total >= reserved >= 0 for total, reserved in seen), [s for s in seen if s[0] < s[1]][:3]
    await books_agree(clients[0])


@pytest.mark.parametrize("scope", ["key", "user"])
async def test_daily_budget_worth_150_holds_admits_exactly_150_of_200(
    clients: list[QuotaServiceAsyncStub], scope: str
) -> None:
    model = await priced(clients[0])
    user = await funded(clients[0], 1_000 * HOLD)
    key = new_id("k")
    scope_id = key if scope == "key" else user
    await call(
        clients[1].SetBudget,
        pb.SetBudgetRequest(
            scope=scope, scope_id=scope_id, period="day", limit_micros=150 * HOLD, actor="tests"
        ),
        timeout=TIMEOUT,
    )

    held, refused = split(
        await reserve_all(clients, [reserve_request(new_id("rsv"), user, model, key=key) for _ in range(200)])
    )

    assert (len(held), len(refused)) == (150, 50), (refused[:2], refused[-2:])
    assert all(isinstance(exc, BudgetExceeded) for exc in refused), refused[:3]
    assert isinstance(refused[0], GatewayError)
    assert f"the daily budget of {scope} {scope_id}" in refused[0].message
    await settle_all(clients, held)
    budgets = await call(
        clients[0].GetBudgets,
        pb.GetBudgetsRequest(scope=scope, scope_id=scope_id, consistent=True),
        timeout=TIMEOUT,
    )
    day = next(b for b in budgets.budgets if b.period == "day")
    assert (day.spent_micros, day.reserved_micros, day.effective_limit_micros) == (150 * HOLD, 0, 150 * HOLD)
    assert day.resets_at - day.window_start == 86_400
    balance = await call(
        clients[1].GetBalance, pb.GetBalanceRequest(user_id=user, consistent=True), timeout=TIMEOUT
    )
    assert balance.balance_micros == 850 * HOLD
    await books_agree(clients[1])


async def test_rpm_of_150_admits_exactly_150_of_200(clients: list[QuotaServiceAsyncStub]) -> None:
    model = await priced(clients[0])
    user = await funded(clients[0], 1_000 * HOLD)
    key = new_id("k")
    limits = types_pb2.Limits(rpm=150)

    results = await reserve_all(
        clients, [reserve_request(new_id("rsv"), user, model, key=key, key_limits=limits) for _ in range(200)]
    )

    held, refused = split(results)
    assert (len(held), len(refused)) == (150, 50)
    assert all(isinstance(exc, RateLimited) for exc in refused), refused[:3]
    assert all(
        isinstance(exc, GatewayError) and exc.retry_after is not None and 0 < exc.retry_after <= 61
        for exc in refused
    )
    # Each admission counted atomically: the 150 answers saw every remaining count from 149 down to 0.
    assert sorted(h.requests.remaining for h in held) == list(range(150))
    assert {h.requests.limit for h in held} == {150}
    assert not any(h.HasField("tokens") for h in held)
    balance = await call(
        clients[0].GetBalance, pb.GetBalanceRequest(user_id=user, consistent=True), timeout=TIMEOUT
    )
    assert balance.reserved_micros == 150 * HOLD, "refused requests hold nothing"
    await settle_all(clients, held)


async def test_concurrency_of_5_never_has_more_than_5_in_flight(
    clients: list[QuotaServiceAsyncStub], redis: Redis
) -> None:
    model = await priced(clients[0])
    user = await funded(clients[0], 100_000 * HOLD)
    key = new_id("k")
    limits = types_pb2.Limits(max_concurrency=5)
    lease_set = f"{PREFIX}lease:key:{key}"

    held, refused = split(
        await reserve_all(
            clients,
            [reserve_request(new_id("rsv"), user, model, key=key, key_limits=limits) for _ in range(200)],
        )
    )
    assert (len(held), len(refused)) == (5, 195)
    assert all(isinstance(exc, ConcurrencyLimited) for exc in refused), refused[:3]
    assert await redis.zcard(lease_set) == 5
    await settle_all(clients, held)
    assert await redis.zcard(lease_set) == 0

    # Churn: 40 workers keep trying; a holder counts itself in flight from its reserve's answer to
    # its settle's request, a strict subset of the time quota counts its slot.
    in_flight = peak = completed = 0
    lease_samples: list[int] = []
    deadline = time.monotonic() + 3.0

    async def worker(index: int) -> None:
        nonlocal in_flight, peak, completed
        stub = clients[index % 2]
        while time.monotonic() < deadline:
            rid = new_id("rsv")
            try:
                await call(
                    stub.Reserve,
                    reserve_request(rid, user, model, key=key, key_limits=limits),
                    timeout=TIMEOUT,
                )
            except ConcurrencyLimited:
                await asyncio.sleep(0.002)
                continue
            in_flight += 1
            peak = max(peak, in_flight)
            await asyncio.sleep(0.02)
            in_flight -= 1
            await call(
                clients[(index + 1) % 2].Settle,
                pb.SettleRequest(reservation_id=rid, usage=FULL_USAGE),
                timeout=TIMEOUT,
            )
            completed += 1

    async def sample() -> None:
        while time.monotonic() < deadline:
            lease_samples.append(await redis.zcard(lease_set))
            await asyncio.sleep(0.001)

    await asyncio.gather(sample(), *(worker(i) for i in range(40)))

    assert 3 <= peak <= 5, f"in flight peaked at {peak}"
    assert max(lease_samples) <= 5 and 5 in lease_samples, "the slots were saturated, never exceeded"
    assert completed > 20
    assert await redis.zcard(lease_set) == 0
    await books_agree(clients[0])


# -- idempotency ----------------------------------------------------------------------------------------


async def test_idempotency_races_across_processes_hold_and_charge_once(
    clients: list[QuotaServiceAsyncStub],
) -> None:
    model = await priced(clients[0])
    user = await funded(clients[0], 100 * HOLD)
    rid = new_id("rsv")
    limits = types_pb2.Limits(rpm=100, max_concurrency=3)

    holds = await reserve_all(
        clients, [reserve_request(rid, user, model, key="k_same", key_limits=limits)] * 20
    )
    assert all(isinstance(h, pb.ReserveResponse) for h in holds), holds[:3]
    balance = await call(
        clients[0].GetBalance, pb.GetBalanceRequest(user_id=user, consistent=True), timeout=TIMEOUT
    )
    assert balance.reserved_micros == HOLD

    outcomes = await asyncio.gather(
        call(clients[0].Settle, pb.SettleRequest(reservation_id=rid, usage=FULL_USAGE), timeout=TIMEOUT),
        call(clients[1].Release, pb.ReleaseRequest(reservation_id=rid, reason="gone"), timeout=TIMEOUT),
        call(clients[1].Settle, pb.SettleRequest(reservation_id=rid, usage=FULL_USAGE), timeout=TIMEOUT),
        call(clients[0].Release, pb.ReleaseRequest(reservation_id=rid), timeout=TIMEOUT),
    )
    winners = [o for o in outcomes if not o.repeated]
    assert len(winners) == 1
    assert {(o.state, o.charged_micros) for o in outcomes} == {(winners[0].state, winners[0].charged_micros)}
    with pytest.raises(Conflict):
        await call(clients[1].Reserve, reserve_request(rid, user, model), timeout=TIMEOUT)
    page = await call(
        clients[0].ListReservations,
        pb.ListReservationsRequest(user_id=user, consistent=True),
        timeout=TIMEOUT,
    )
    assert [(r.reservation_id, r.state) for r in page.reservations] == [(rid, winners[0].state)]
    await books_agree(clients[1])


# -- a quota process dies between Reserve and Settle ---------------------------------------------------------


async def test_killed_process_strands_nothing_after_the_ttl(
    backing: BackingServices, migrated_db: DbUrls, log_dir: Path, redis: Redis
) -> None:
    overrides = {"RELAYGATE_RESERVATION_TTL_S": "2", "RELAYGATE_EXPIRY_SWEEP_INTERVAL_S": "0.2"}
    with quota_processes(backing, migrated_db, log_dir, **overrides) as processes:
        doomed, survivor = processes.start("doomed"), processes.start("survivor")
        async with stubs(doomed, survivor) as (a, b):
            model = await priced(b)
            user = await funded(b, 10 * HOLD)
            key = new_id("k")
            limits = types_pb2.Limits(max_concurrency=1)
            rid = new_id("rsv")
            await call(
                a.Reserve, reserve_request(rid, user, model, key=key, key_limits=limits), timeout=TIMEOUT
            )

            doomed.kill(signal.SIGKILL)

            with pytest.raises(ConcurrencyLimited):
                await call(
                    b.Reserve,
                    reserve_request(new_id("rsv"), user, model, key=key, key_limits=limits),
                    timeout=TIMEOUT,
                )
            deadline = time.monotonic() + 15
            while True:
                balance = await call(
                    b.GetBalance, pb.GetBalanceRequest(user_id=user, consistent=True), timeout=TIMEOUT
                )
                if balance.reserved_micros == 0 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)

            assert (balance.balance_micros, balance.reserved_micros) == (10 * HOLD, 0)
            late = await call(
                b.Settle, pb.SettleRequest(reservation_id=rid, usage=FULL_USAGE), timeout=TIMEOUT
            )
            assert (late.state, late.charged_micros, late.repeated) == ("expired", 0, True)
            assert await redis.zcard(f"{PREFIX}lease:key:{key}") == 0
            await call(
                b.Reserve,
                reserve_request(new_id("rsv"), user, model, key=key, key_limits=limits),
                timeout=TIMEOUT,
            )
            await books_agree(b)


# -- reconciliation --------------------------------------------------------------------------------------


def reconcile_cli(db: DbUrls) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.quota", "reconcile", "--consistent"],
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "RELAYGATE_DATABASE_URL": db.primary, "RELAYGATE_LOG_LEVEL": "WARNING"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_randomized_mixed_workload_reconciles(
    backing: BackingServices, migrated_db: DbUrls, log_dir: Path
) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    overrides = {"RELAYGATE_RESERVATION_TTL_S": "3", "RELAYGATE_EXPIRY_SWEEP_INTERVAL_S": "0.3"}
    with quota_processes(backing, migrated_db, log_dir, **overrides) as processes:
        async with stubs(processes.start("mix-a"), processes.start("mix-b")) as clients:
            models = [await priced(clients[0]) for _ in range(3)]
            users = [await funded(clients[0], rng.randrange(5_000, 50_000)) for _ in range(5)]
            keys = [new_id("k") for _ in range(4)]
            caps = [
                ("user", users[0], "month", 20_000),
                ("user", users[1], "month", 30_000),
                ("user", users[2], "month", 30_000),
                ("key", keys[0], "day", 15_000),
                ("key", keys[1], "day", 15_000),
            ]
            for scope, scope_id, period, micros in caps:
                await call(
                    clients[1].SetBudget,
                    pb.SetBudgetRequest(scope=scope, scope_id=scope_id, period=period, limit_micros=micros),
                    timeout=TIMEOUT,
                )
            held: list[str] = []
            outcomes: dict[str, int] = {"held": 0, "refused": 0}

            async def reserve(stub: QuotaServiceAsyncStub) -> None:
                limits = types_pb2.Limits(rpm=rng.choice([0, 40]), max_concurrency=rng.choice([0, 6]))
                request = pb.ReserveRequest(
                    reservation_id=new_id("rsv"),
                    user_id=rng.choice(users),
                    key_id=rng.choice(keys),
                    model=rng.choice(models),
                    prompt_tokens=rng.randrange(0, 400),
                    max_output_tokens=rng.randrange(0, 600),
                    key_limits=limits,
                )
                try:
                    await call(stub.Reserve, request, timeout=TIMEOUT)
                except (InsufficientQuota, BudgetExceeded, RateLimited, ConcurrencyLimited):
                    outcomes["refused"] += 1
                    return
                held.append(request.reservation_id)
                outcomes["held"] += 1

            async def finish(stub: QuotaServiceAsyncStub) -> None:
                rid = rng.choice(held)
                if rng.random() < 0.7:
                    prompt = rng.randrange(0, 800)
                    usage = types_pb2.Usage(
                        prompt_tokens=prompt,
                        cached_prompt_tokens=rng.randrange(0, prompt + 1),
                        completion_tokens=rng.randrange(0, 1200),
                        estimated=rng.random() < 0.1,
                    )
                    await call(
                        stub.Settle, pb.SettleRequest(reservation_id=rid, usage=usage), timeout=TIMEOUT
                    )
                else:
                    await call(stub.Release, pb.ReleaseRequest(reservation_id=rid), timeout=TIMEOUT)

            async def top_up(stub: QuotaServiceAsyncStub) -> None:
                amount = rng.choice([rng.randrange(1, 3_000), -rng.randrange(1, 3_000)])
                key = rng.choice(["", f"k{rng.randrange(20)}"])
                request = pb.TopUpRequest(
                    user_id=rng.choice(users), amount_micros=amount, idempotency_key=key
                )
                with contextlib.suppress(GatewayError):  # an adjustment below the holds, a reused key
                    await call(stub.TopUp, request, timeout=TIMEOUT)

            for _ in range(25):
                batch = []
                for _ in range(12):
                    stub = rng.choice(clients)
                    roll = rng.random()
                    if roll < 0.45 or not held:
                        batch.append(reserve(stub))
                    elif roll < 0.85:
                        batch.append(finish(stub))
                    else:
                        batch.append(top_up(stub))
                await asyncio.gather(*batch)

            # What nobody finished expires; wait for the sweepers, then the books must agree.
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                pages = [
                    await call(
                        clients[0].ListReservations,
                        pb.ListReservationsRequest(user_id=user, state="held", consistent=True),
                        timeout=TIMEOUT,
                    )
                    for user in users
                ]
                if not any(page.reservations for page in pages):
                    break
                await asyncio.sleep(0.2)
            context = f"seed={seed} {outcomes}"
            assert outcomes["held"] > 30 and outcomes["refused"] > 0, context
            report = await call(clients[1].Reconcile, pb.ReconcileRequest(consistent=True), timeout=TIMEOUT)
            assert list(report.discrepancies) == [], context

    clean = reconcile_cli(migrated_db)
    assert (clean.returncode, clean.stdout.strip()) == (0, "the books agree"), clean.stderr
    victim = users[1]
    psql(
        migrated_db.primary,
        f"UPDATE accounts SET balance_micros = balance_micros + 7 WHERE user_id = '{victim}'",
    )
    try:
        broken = reconcile_cli(migrated_db)
    finally:
        psql(
            migrated_db.primary,
            f"UPDATE accounts SET balance_micros = balance_micros - 7 WHERE user_id = '{victim}'",
        )
    assert broken.returncode == 1, broken.stderr
    assert f"balance {victim}:" in broken.stdout and "1 discrepancies" in broken.stdout


# -- Redis goes away -------------------------------------------------------------------------------------


async def test_redis_outage_admits_past_rate_limits_but_never_past_budgets(
    backing: BackingServices, migrated_db: DbUrls, log_dir: Path
) -> None:
    with quota_processes(backing, migrated_db, log_dir) as processes:
        opened = processes.start("fail-open")
        closed = processes.start("fail-closed", RELAYGATE_LIMITS_FAIL_OPEN="false")
        async with stubs(opened, closed) as (open_stub, closed_stub):
            model = await priced(open_stub)
            user = await funded(open_stub, 100 * HOLD)
            key = new_id("k")
            limits = types_pb2.Limits(rpm=3)
            await call(
                open_stub.SetBudget,
                pb.SetBudgetRequest(scope="key", scope_id=key, period="day", limit_micros=8 * HOLD),
                timeout=TIMEOUT,
            )

            def request() -> pb.ReserveRequest:
                return reserve_request(new_id("rsv"), user, model, key=key, key_limits=limits)

            for _ in range(3):
                await call(open_stub.Reserve, request(), timeout=TIMEOUT)
            with pytest.raises(RateLimited):
                await call(open_stub.Reserve, request(), timeout=TIMEOUT)

            backing.stop_redis()
            try:
                admitted = [await call(open_stub.Reserve, request(), timeout=TIMEOUT) for _ in range(5)]
                assert len(admitted) == 5, "fail-open: the RPM limit is not enforced without Redis"
                with pytest.raises(BudgetExceeded):
                    await call(open_stub.Reserve, request(), timeout=TIMEOUT)
                with pytest.raises(ServiceUnavailable):
                    await call(closed_stub.Reserve, request(), timeout=TIMEOUT)
                # Without limits there is nothing to check: fail-closed still serves it.
                await call(closed_stub.Reserve, reserve_request(new_id("rsv"), user, model), timeout=TIMEOUT)
                settled = await settle_all([open_stub], admitted)
                assert {s.state for s in settled} == {"settled"}
            finally:
                backing.start_redis()

            await asyncio.sleep(1.2)  # past the retry interval: the next request tries Redis again
            fresh_key = new_id("k")
            for _ in range(3):
                await call(
                    open_stub.Reserve,
                    reserve_request(
                        new_id("rsv"), user, model, key=fresh_key, key_limits=types_pb2.Limits(rpm=3)
                    ),
                    timeout=TIMEOUT,
                )
            with pytest.raises(RateLimited):
                await call(
                    open_stub.Reserve,
                    reserve_request(
                        new_id("rsv"), user, model, key=fresh_key, key_limits=types_pb2.Limits(rpm=3)
                    ),
                    timeout=TIMEOUT,
                )
            await books_agree(open_stub)
    log = opened.log()
    assert log.count("limit state unreachable") == 1, "one line per outage"
    assert "limit state reachable again" in log


# -- replicas --------------------------------------------------------------------------------------------


async def test_balance_after_top_up_reads_its_own_write_with_replica_paused(
    clients: list[QuotaServiceAsyncStub], backing: BackingServices
) -> None:
    stub = clients[0]
    user = new_id("u")
    first = await call(stub.TopUp, pb.TopUpRequest(user_id=user, amount_micros=1_000), timeout=TIMEOUT)
    assert first.written_lsn > 0
    caught_up = await call(
        stub.GetBalance, pb.GetBalanceRequest(user_id=user, min_lsn=first.written_lsn), timeout=TIMEOUT
    )
    assert caught_up.balance_micros == 1_000

    backing.pause_replica_replay()
    try:
        second = await call(stub.TopUp, pb.TopUpRequest(user_id=user, amount_micros=234), timeout=TIMEOUT)
        own = await call(
            stub.GetBalance, pb.GetBalanceRequest(user_id=user, min_lsn=second.written_lsn), timeout=TIMEOUT
        )
        primary = await call(
            stub.GetBalance, pb.GetBalanceRequest(user_id=user, consistent=True), timeout=TIMEOUT
        )
        # The default read goes to the frozen replica: proof the replica really is behind.
        stale = await call(stub.GetBalance, pb.GetBalanceRequest(user_id=user), timeout=TIMEOUT)
    finally:
        backing.resume_replica_replay()
    assert (own.balance_micros, primary.balance_micros, stale.balance_micros) == (1_234, 1_234, 1_000)
