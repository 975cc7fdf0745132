"""Credit control end to end: two relays and two quota processes on the real backing services.

Both relays reach both quota processes (round robin over one gRPC target), so a relay's consecutive
syncs and reserves are answered by different quota processes, and each relay holds leases of its own.
What must hold across all of them:

* exactly 150 of 200 concurrent requests get through when the balance, a daily budget or an RPM limit
  allows 150, whichever relay they reach, after both relays hold leases of the key, and every refusal
  is the exact path's 429 (a request that met a recall waited for the leases to come back); the same
  when the 200 rotate over 20 keys of the user sharing its leases, and a key with a budget of its own
  stops at it while its user's other keys share a lease; a concurrency limit of 5 admits 5 of 20 long
  streams and never has more than 5 at the upstream;
* quota stopped (SIGSTOP) for 10 s under load fails no request of a leased key, and a key never used
  before gets a clean 503 with ``Retry-After``;
* a relay SIGKILLed with requests in flight charges nothing for them, and its leases expire and give
  their unused part back;
* after a seeded random workload (streams and not, upstream failures, budgets, limits, small
  balances) the ledger's charge of every request id equals the cost the logger recorded for it, and
  reconcile finds nothing.

Prices: :data:`FLAT_MODEL` costs :data:`UNIT` per request whatever its tokens, so a request's worst case
equals its cost and "exactly N" is exact; the randomized workload uses the token-priced ``MODEL``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from devinfra.backing import BackingServices
from services.common.db import Database
from services.migrations import upgrade
from tests.db_fixtures import DbUrls
from tests.e2e.stack import MODEL, Deployment, deploy_pairs, ok

FLAT_MODEL = "gpt-e2e-flat"
UNIT = 1_000
FLAT_PRICE = {"per_request": UNIT, "default_max_output_tokens": 16}

# Every service of the module's deployment reads these. A grant stays valid 15 s, so a 10 s quota
# outage is covered with room for a loaded machine; syncs every 250 ms keep waits short.
CREDIT_ENV = {
    "RELAYGATE_CREDIT_SYNC_INTERVAL_MS": "250",
    "RELAYGATE_CREDIT_VALID_FOR_MS": "15000",
    "RELAYGATE_CREDIT_MARGIN_MS": "1000",
    "RELAYGATE_CREDIT_GRACE_MS": "1000",
    "RELAYGATE_CREDIT_HORIZON_MS": "2000",
    # Generous: 200 requests at once on a shared 2-core machine must not meet a deadline.
    "RELAYGATE_RPC_TIMEOUT_S": "4",
    "RELAYGATE_EXPIRY_SWEEP_INTERVAL_S": "0.5",
    "RELAYGATE_GRPC_DRAIN_SECONDS": "2",
    "RELAYGATE_SETTLE_SHUTDOWN_S": "3",
    # Relays price leased requests from their own copy of the price book: load a new price quickly.
    "RELAYGATE_PRICE_REFRESH_S": "0.5",
}
# The relay-kill deployment: leases expire within about 5 s of their relay's last sync. Not shorter: a
# lease admits for validity - margin after the last sync quota answered, and a stall of the loaded
# machine longer than that (syncs time out) rightly closes it, sending the test's requests down the
# exact path instead of onto the lease the test is about.
SHORT_ENV = {
    **CREDIT_ENV,
    "RELAYGATE_CREDIT_SYNC_INTERVAL_MS": "200",
    "RELAYGATE_CREDIT_VALID_FOR_MS": "4000",
    "RELAYGATE_CREDIT_MARGIN_MS": "500",
    "RELAYGATE_CREDIT_GRACE_MS": "500",
    "RELAYGATE_CREDIT_HORIZON_MS": "1000",
    # Requests the dead relay had sent on the exact path expire about as fast (and not before the test
    # has seen them held).
    "RELAYGATE_RESERVATION_TTL_S": "6",
    "RELAYGATE_SETTLE_RETRY_S": "2",
}
QUOTA_OUTAGE_S = 10.0
RANDOM_SEED = int(os.environ.get("RELAYGATE_CREDIT_E2E_SEED", "20261203"))


# -- the deployment --------------------------------------------------------------------------------------


def serve_flat_model(deployment: Deployment, **channel_fields: object) -> None:
    """A channel on the deployment's fake upstream serving :data:`FLAT_MODEL` at :data:`FLAT_PRICE`."""
    with deployment.admin() as admin:
        ok(
            admin.post(
                "/admin/v1/channels",
                json={
                    "name": "flat",
                    "base_url": deployment.upstream.base_url,
                    "models": [FLAT_MODEL],
                    "weight": 1,
                    "enabled": True,
                    **channel_fields,
                },
            )
        )
        ok(admin.put(f"/admin/v1/prices/{FLAT_MODEL}", json=FLAT_PRICE))
    _, _, key = account(deployment, 10 * UNIT)
    # Relays poll the channel table; wait until every one of them routes the new model.
    deadline = time.monotonic() + 20
    for url in deployment.relay_urls:
        while True:
            models = httpx.get(f"{url}/v1/models", headers={"authorization": f"Bearer {key}"}, timeout=10)
            if models.status_code == 200 and FLAT_MODEL in {m["id"] for m in models.json()["data"]}:
                break
            assert time.monotonic() < deadline, f"{url} does not serve {FLAT_MODEL}: {models.text}"
            time.sleep(0.2)


@pytest.fixture(scope="module")
def deployment(
    backing: BackingServices, migrated_db: DbUrls, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    with deploy_pairs(
        backing, migrated_db, tmp_path_factory.mktemp("credit-logs"), service_env=CREDIT_ENV
    ) as running:
        serve_flat_model(running)
        yield running


@pytest.fixture(scope="module")
async def books(migrated_db: DbUrls) -> AsyncIterator[Books]:
    async with Books.open(migrated_db) as opened:
        yield opened


@pytest.fixture(autouse=True)
def _calm_upstream(request: pytest.FixtureRequest) -> Iterator[None]:
    """Tests on the module's deployment start and end with the upstream's default behaviour."""
    if "deployment" not in request.fixturenames:
        yield
        return
    upstream = request.getfixturevalue("deployment").upstream
    upstream.reset()
    yield
    upstream.reset()


# -- accounts, requests and the books --------------------------------------------------------------------


def account(deployment: Deployment, amount_micros: int, **key_fields: object) -> tuple[str, str, str]:
    """A new user with ``amount_micros`` of credit and one key: (user id, key id, plaintext key)."""
    with deployment.admin() as admin:
        user_id = str(
            ok(admin.post("/admin/v1/users", json={"name": f"credit-{time.monotonic_ns()}"}))["user_id"]
        )
        ok(
            admin.post(
                f"/admin/v1/users/{user_id}/topups", json={"amount_micros": amount_micros, "reason": "t"}
            )
        )
        created = ok(admin.post("/admin/v1/keys", json={"user_id": user_id, "name": "credit", **key_fields}))
    return user_id, str(created["key"]["key_id"]), str(created["api_key"])


def admin_get(deployment: Deployment, path: str, **params: str) -> dict[str, Any]:
    with deployment.admin() as admin:
        return ok(admin.get(path, params=params, timeout=60))


def balance_of(deployment: Deployment, user_id: str) -> tuple[int, int]:
    body = admin_get(deployment, f"/admin/v1/users/{user_id}/balance", consistent="true")
    return int(body.get("balance_micros", 0)), int(body.get("reserved_micros", 0))


def assert_reconciled(deployment: Deployment) -> None:
    report = admin_get(deployment, "/admin/v1/reconcile", consistent="true")
    assert report.get("discrepancies", []) == [], report


@dataclass(frozen=True)
class Reply:
    url: str
    status: int  # 0: no answer (the connection failed or was cut)
    code: str  # the error's code, empty on success
    request_id: str
    retry_after: str | None
    error: dict[str, Any]
    at: float


async def chat(
    client: httpx.AsyncClient,
    url: str,
    key: str,
    *,
    model: str = FLAT_MODEL,
    stream: bool = False,
    max_tokens: int = 4,
    content: str = "credit",
) -> Reply:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "stream": stream,
    }
    status, request_id, retry_after, payload = 0, "", None, b""
    try:
        async with client.stream(
            "POST", f"{url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}
        ) as response:
            status = response.status_code
            request_id = response.headers.get("x-request-id", "")
            retry_after = response.headers.get("retry-after")
            payload = await response.aread()
    except httpx.HTTPError:
        # A stream cut after its head keeps the status it had; anything else had no answer.
        status = status if stream else 0
    error: dict[str, Any] = {}
    if status >= 400:
        with contextlib.suppress(ValueError):
            error = dict(httpx.Response(status, content=payload).json().get("error") or {})
    return Reply(url, status, str(error.get("code") or ""), request_id, retry_after, error, time.monotonic())


def client(connections: int = 250) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        timeout=30, limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    )


async def burst(deployment: Deployment, key: str | list[str], count: int, **fields: Any) -> list[Reply]:
    """``count`` requests at once, alternating between the relays (and between ``key``'s keys)."""
    urls = deployment.relay_urls
    keys = [key] if isinstance(key, str) else key
    async with client() as http:
        return await asyncio.gather(
            *(chat(http, urls[i % len(urls)], keys[i % len(keys)], **fields) for i in range(count))
        )


def more_keys(
    deployment: Deployment, user_id: str, count: int, **key_fields: object
) -> list[tuple[str, str]]:
    """``count`` more keys of ``user_id``: (key id, plaintext key)."""
    with deployment.admin() as admin:
        created = [
            ok(admin.post("/admin/v1/keys", json={"user_id": user_id, "name": f"more-{n}", **key_fields}))
            for n in range(count)
        ]
    return [(str(c["key"]["key_id"]), str(c["api_key"])) for c in created]


def outcomes(replies: list[Reply]) -> collections.Counter[tuple[int, str]]:
    return collections.Counter((r.status, r.code) for r in replies)


async def assert_exactly_served(
    replies: list[Reply], served: int, refusal: str, state: Callable[[], str]
) -> None:
    """Exactly ``served`` replies are 200 and every other one is the 429 ``refusal``: a request that
    met a recall waited until the leases' unused part came back, so none is refused ``credit_recalled``
    while units are left. Otherwise fail saying what was left once the requests in flight had time to
    finish (units left unspent, or spent twice)."""
    found = outcomes(replies)
    if found != {(200, ""): served, (429, refusal): len(replies) - served}:
        await asyncio.sleep(2.0)
        raise AssertionError(f"outcomes {dict(found)}, expected {served} served; {state()}")


def day_of(deployment: Deployment, key_id: str) -> tuple[int, int]:
    """The key's daily budget window: (spent, held)."""
    budgets = admin_get(deployment, f"/admin/v1/budgets/key/{key_id}", consistent="true")["budgets"]
    day = next(b for b in budgets if b["period"] == "day")
    return int(day.get("spent_micros", 0)), int(day.get("reserved_micros", 0))


async def eventually(check: Callable[[], Awaitable[object]], what: str, timeout: float) -> None:
    """Wait until ``check`` returns something empty; fail with what it last returned."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if not result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} after {timeout:g}s: {result}")
        await asyncio.sleep(0.25)


@dataclass(frozen=True)
class LeaseRow:
    relay_id: str
    state: str  # held, settled (closed by its relay) or expired
    phase: str  # open, closing, expired or closed
    held: int
    inflight: int  # as its relay last reported
    given_up: bool  # by quota, because its relay stopped syncing


class Books:
    """The ledger, the holds and the request logs, read from the primary."""

    def __init__(self, db: Database) -> None:
        self._db = db

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, urls: DbUrls) -> AsyncIterator[Books]:
        db = Database(urls.settings(database_replica_urls=[]))
        await db.start()
        try:
            yield cls(db)
        finally:
            await db.close()

    async def rows(self, sql: str, **params: object) -> list[tuple[Any, ...]]:
        async with self._db.reader(consistent=True) as session:
            return [tuple(row) for row in await session.execute(text(sql), params)]

    async def charges(self, users: list[str]) -> dict[str, int]:
        """Request id -> the cost the ledger booked for it (charged plus any write-off)."""
        rows = await self.rows(
            "SELECT reservation_id, written_off_micros - amount_micros FROM ledger_entries "
            "WHERE kind = 'charge' AND user_id = ANY(:users)",
            users=users,
        )
        return {str(r[0]): int(r[1]) for r in rows}

    async def written_off(self, users: list[str]) -> int:
        rows = await self.rows(
            "SELECT coalesce(sum(written_off_micros), 0) FROM ledger_entries WHERE user_id = ANY(:users)",
            users=users,
        )
        return int(rows[0][0])

    async def logged(self, users: list[str]) -> dict[str, int]:
        """Request id -> the cost the logger recorded."""
        rows = await self.rows(
            "SELECT event_id, cost_micros FROM request_logs WHERE user_id = ANY(:users) AND aggregated = 0",
            users=users,
        )
        return {str(r[0]): int(r[1]) for r in rows}

    async def disagreements(self, users: list[str]) -> list[str]:
        """Request ids whose ledger cost differs from their logged cost (absent on either side: 0)."""
        charged, logged = await self.charges(users), await self.logged(users)
        return [
            f"{rid}: ledger {charged.get(rid)}, logged {logged.get(rid)}"
            for rid in sorted(set(charged) | set(logged))
            if charged.get(rid, 0) != logged.get(rid, 0)
        ]

    async def leases(self, user_id: str) -> list[LeaseRow]:
        rows = await self.rows(
            "SELECT relay_id, state, phase, reserved_micros, inflight_reported_micros, given_up "
            "FROM reservations WHERE user_id = :user AND kind = 'lease' ORDER BY created_at",
            user=user_id,
        )
        return [LeaseRow(str(r[0]), str(r[1]), str(r[2]), int(r[3]), int(r[4]), bool(r[5])) for r in rows]

    async def open_leases(self, user_id: str) -> dict[str, tuple[str, int]]:
        """The user's open leases: lease id -> (relay id, the sequence number of the last sync quota
        applied to it: the relay's sync that asked for it, then each one reporting on it)."""
        rows = await self.rows(
            "SELECT id, relay_id, seq FROM reservations "
            "WHERE user_id = :user AND kind = 'lease' AND state = 'held' AND phase = 'open'",
            user=user_id,
        )
        return {str(r[0]): (str(r[1]), int(r[2])) for r in rows}

    async def lease_keys(self, user_id: str) -> set[str]:
        """The key ids of the user's leases, whatever their state (empty: the user's shared lease)."""
        rows = await self.rows(
            "SELECT key_id FROM reservations WHERE user_id = :user AND kind = 'lease'", user=user_id
        )
        return {str(r[0]) for r in rows}

    async def lease_ids(self, request_ids: list[str]) -> list[str]:
        """The lease each request was admitted on, as logged (empty: the exact path)."""
        rows = await self.rows(
            "SELECT lease_id FROM request_logs WHERE event_id = ANY(:ids)", ids=request_ids
        )
        return [str(r[0]) for r in rows]

    async def reservations_held(self, users: list[str]) -> list[str]:
        rows = await self.rows(
            "SELECT id FROM reservations "
            "WHERE user_id = ANY(:users) AND kind = 'reservation' AND state = 'held'",
            users=users,
        )
        return [str(r[0]) for r in rows]


async def books_agree(books: Books, deployment: Deployment, users: list[str], *, timeout: float = 40) -> None:
    """Every hold of ``users`` settled, ledger == logs per request id, nothing written off, reconcile
    clean."""
    await eventually(lambda: books.reservations_held(users), "reservations still held", timeout)
    await eventually(lambda: books.disagreements(users), "ledger and request logs disagree", timeout)
    assert await books.written_off(users) == 0
    assert_reconciled(deployment)


async def hold_leases_everywhere(
    deployment: Deployment, books: Books, key: str, user_id: str, urls: list[str] | None = None
) -> None:
    """Warm ``key`` on every relay of ``urls`` (default: all) until each admits on an open lease of it.

    A lease row is open once quota committed the grant, before its answer reached the relay; the relay
    reports on a lease only once it applied the grant, so a lease whose sync sequence number rose since
    it was first seen open is one its relay admits on (within one sync interval of the grant).

    The upstream fails the warm-up requests (503), and a failed request costs nothing: the balances and
    budgets the tests count on are untouched, however many requests it takes."""
    urls = urls or deployment.relay_urls
    first_seen: dict[str, int] = {}
    deployment.upstream.configure(fail_status=503, fail_count=-1)
    try:
        async with client() as http:
            deadline = time.monotonic() + 15
            while True:
                opened = await books.open_leases(user_id)
                for lease_id, (_, seq) in opened.items():
                    first_seen.setdefault(lease_id, seq)
                holding = {relay for relay, _ in opened.values()}
                applied = {relay for lease, (relay, seq) in opened.items() if seq > first_seen[lease]}
                if len(applied) >= len(urls):
                    return
                assert time.monotonic() < deadline, (
                    f"relays hold no lease of the key: open on {holding}, applied on {applied}"
                )
                if len(holding) >= len(urls):
                    # Granted everywhere: only the relays' next syncs are awaited.
                    await asyncio.sleep(0.05)
                    continue
                for url in urls:
                    warm = await chat(http, url, key)
                    assert warm.status >= 500, (warm.status, warm.error)
                await asyncio.sleep(0.3)
    finally:
        deployment.upstream.reset()


async def settled_to(
    deployment: Deployment, user_id: str, expected: tuple[int, int], timeout: float = 40
) -> None:
    async def differs() -> str:
        found = balance_of(deployment, user_id)
        return "" if found == expected else f"balance and held {found}, expected {expected}"

    await eventually(differs, "the account did not settle", timeout)


# -- exactly N of 200 ------------------------------------------------------------------------------------


async def test_a_balance_worth_150_admits_exactly_150_of_200_across_relays(
    deployment: Deployment, books: Books
) -> None:
    user_id, _, key = account(deployment, 150 * UNIT)
    await hold_leases_everywhere(deployment, books, key, user_id)

    replies = await burst(deployment, key, 200)

    await assert_exactly_served(
        replies,
        150,
        "insufficient_quota",
        lambda: f"balance and held afterwards: {balance_of(deployment, user_id)}",
    )
    refused = [r.error for r in replies if r.status == 429]
    assert all(set(e) >= {"message", "type", "param", "code"} and e["message"] for e in refused), refused
    assert {r.url for r in replies if r.status == 200} == set(deployment.relay_urls)
    await settled_to(deployment, user_id, (0, 0))
    await books_agree(books, deployment, [user_id])
    charged = await books.charges([user_id])
    assert sorted(charged.values()) == [UNIT] * 150
    assert {r.request_id for r in replies if r.status == 200} <= set(charged)


async def test_a_balance_worth_150_admits_exactly_150_of_200_over_20_keys_sharing_the_users_leases(
    deployment: Deployment, books: Books
) -> None:
    user_id, _, key = account(deployment, 150 * UNIT)
    keys = [key] + [plain for _, plain in more_keys(deployment, user_id, 19)]
    await hold_leases_everywhere(deployment, books, key, user_id)
    # One lease per relay, the user's: no key of its own.
    leases = [lease for lease in await books.leases(user_id) if lease.state == "held"]
    assert len(leases) == len(deployment.relay_urls), leases
    assert await books.lease_keys(user_id) == {""}

    replies = await burst(deployment, keys, 200)

    await assert_exactly_served(
        replies,
        150,
        "insufficient_quota",
        lambda: f"balance and held afterwards: {balance_of(deployment, user_id)}",
    )
    await settled_to(deployment, user_id, (0, 0))
    await books_agree(books, deployment, [user_id])
    assert sorted((await books.charges([user_id])).values()) == [UNIT] * 150


async def test_a_key_with_a_budget_of_its_own_stops_at_it_beside_its_users_shared_leases(
    deployment: Deployment, books: Books
) -> None:
    user_id, _, key = account(deployment, 1_000 * UNIT)
    plain = [key] + [k for _, k in more_keys(deployment, user_id, 3)]
    await hold_leases_everywhere(deployment, books, key, user_id)
    assert await books.lease_keys(user_id) == {""}
    cap = 30 * UNIT
    [(budget_key_id, budget_key)] = more_keys(deployment, user_id, 1, limits={"daily_budget_micros": cap})
    # Relays learn the budgeted keys with their syncs (quota reads its list at most every half
    # interval): a budget set on a key applies to the shared leases within two intervals.
    await asyncio.sleep(4 * int(CREDIT_ENV["RELAYGATE_CREDIT_SYNC_INTERVAL_MS"]) / 1000)

    # 40 requests of the budgeted key among 160 of the user's other keys, over both relays.
    keys = [budget_key, *plain]
    replies = await burst(deployment, keys, 200)

    budgeted = replies[0 :: len(keys)]
    others = [r for i, r in enumerate(replies) if i % len(keys)]
    assert outcomes(others) == {(200, ""): 160}, outcomes(others)
    await assert_exactly_served(
        budgeted, 30, "budget_exceeded", lambda: f"day window afterwards: {day_of(deployment, budget_key_id)}"
    )
    # Whatever the budgeted key got, it got on holds counting against its budget.
    assert await books.lease_keys(user_id) <= {"", budget_key_id}
    await settled_to(deployment, user_id, (810 * UNIT, 0))

    async def day_window() -> str:
        found = day_of(deployment, budget_key_id)
        return "" if found == (cap, 0) else f"day window spent and held {found}"

    await eventually(day_window, "the key's daily budget did not settle", timeout=30)
    await books_agree(books, deployment, [user_id])


@pytest.mark.parametrize("source", ["key limits", "budgets route"])
async def test_a_daily_budget_worth_150_admits_exactly_150_of_200_across_relays(
    deployment: Deployment, books: Books, source: str
) -> None:
    """Set with the key (``limits.daily_budget_micros``, as LiteLLM/new-api operators do) or on the
    budgets route: either way it is quota's budget, the one cap in force."""
    cap = 150 * UNIT
    limits = {"daily_budget_micros": cap} if source == "key limits" else {}
    user_id, key_id, key = account(deployment, 1_000 * UNIT, limits=limits)
    if source == "budgets route":
        with deployment.admin() as admin:
            ok(admin.put(f"/admin/v1/budgets/key/{key_id}/day", json={"limit_micros": cap}))
    budgets = admin_get(deployment, f"/admin/v1/budgets/key/{key_id}", consistent="true")["budgets"]
    assert {b["period"]: int(b["limit_micros"]) for b in budgets} == {"day": cap, "month": 0}
    await hold_leases_everywhere(deployment, books, key, user_id)

    replies = await burst(deployment, key, 200)

    await assert_exactly_served(
        replies, 150, "budget_exceeded", lambda: f"day window afterwards: {day_of(deployment, key_id)}"
    )
    await settled_to(deployment, user_id, (850 * UNIT, 0))

    async def day_window() -> str:
        found = day_of(deployment, key_id)
        return "" if found == (cap, 0) else f"day window spent and held {found}"

    await eventually(day_window, "the daily budget did not settle", timeout=30)
    await books_agree(books, deployment, [user_id])


async def test_an_rpm_of_150_admits_exactly_150_of_200_across_relays(
    deployment: Deployment, books: Books
) -> None:
    user_id, _, key = account(deployment, 1_000 * UNIT, limits={"rpm": 150})

    replies = await burst(deployment, key, 200)

    assert outcomes(replies) == {(200, ""): 150, (429, "rate_limit_exceeded"): 50}, outcomes(replies)
    refused = [r for r in replies if r.status == 429]
    assert all(r.retry_after and 0 < int(r.retry_after) <= 61 for r in refused), refused[:2]
    # A key with a rate limit stays on the exact path: no relay leases it.
    assert await books.leases(user_id) == []
    await settled_to(deployment, user_id, (850 * UNIT, 0))
    await books_agree(books, deployment, [user_id])


async def test_a_concurrency_of_5_admits_5_at_a_time_across_relays(
    deployment: Deployment, books: Books
) -> None:
    user_id, _, key = account(deployment, 1_000 * UNIT, limits={"max_concurrency": 5})
    upstream = deployment.upstream
    # Each stream lasts about 3 s at the upstream: every request of the wave arrives while 5 are open.
    upstream.configure(chunks=30, chunk_interval_ms=100)
    peak = 0
    sampling = True

    async def sample() -> None:
        nonlocal peak
        while sampling:
            peak = max(peak, (await asyncio.to_thread(upstream.stats))["open_streams"])
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample())
    try:
        wave = await burst(deployment, key, 20, stream=True, max_tokens=30)
    finally:
        sampling = False
        await sampler

    assert outcomes(wave) == {(200, ""): 5, (429, "concurrency_limit_exceeded"): 15}, outcomes(wave)
    assert all(r.retry_after for r in wave if r.status == 429)
    assert peak == 5, f"open streams at the upstream peaked at {peak}"
    upstream.configure(chunks=4, chunk_interval_ms=0)
    # The slots come back as the wave's reservations are settled: then the next five fit again.
    await eventually(lambda: books.reservations_held([user_id]), "the wave's holds were not settled", 20)
    again = await burst(deployment, key, 5, stream=True)
    assert outcomes(again) == {(200, ""): 5}, outcomes(again)
    assert await books.leases(user_id) == []
    await settled_to(deployment, user_id, (990 * UNIT, 0))
    await books_agree(books, deployment, [user_id])


# -- quota stopped under load ----------------------------------------------------------------------------


class Load:
    """Workers sending requests of one key to every relay (every other one streamed) until stopped."""

    def __init__(self, urls: list[str], key: str, workers_per_relay: int = 2) -> None:
        self._urls = urls
        self._key = key
        self._workers = workers_per_relay
        self._running = True
        self.replies: list[Reply] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._http = client()

    async def __aenter__(self) -> Load:
        for url in self._urls:
            for worker in range(self._workers):
                self._tasks.append(asyncio.create_task(self._run(url, worker)))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._running = False
        await asyncio.gather(*self._tasks)
        await self._http.aclose()

    async def _run(self, url: str, worker: int) -> None:
        n = 0
        while self._running:
            n += 1
            self.replies.append(
                await chat(
                    self._http, url, self._key, model=MODEL, stream=n % 2 == 0, content=f"load {worker} {n}"
                )
            )
            await asyncio.sleep(0.02)


def signal_group(deployment: Deployment, names: list[str], sig: signal.Signals) -> None:
    for name in names:
        os.killpg(deployment.process(name).pid, sig)


async def test_quota_stopped_for_10_s_fails_no_request_of_a_leased_key(
    deployment: Deployment, books: Books
) -> None:
    user_id, _, key = account(deployment, 1_000_000_000)
    fresh_user, _, fresh_key = account(deployment, 1_000_000_000)
    await hold_leases_everywhere(deployment, books, key, user_id)
    quotas = ["quota", "quota-b"]

    async with Load(deployment.relay_urls, key) as load:
        # Steady traffic first, so the leases grow to cover the key's spend rate.
        await asyncio.sleep(3.0)
        before = len(load.replies)
        signal_group(deployment, quotas, signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            await asyncio.sleep(1.0)
            async with client() as http:
                newcomers = [await chat(http, url, fresh_key, model=MODEL) for url in deployment.relay_urls]
            await asyncio.sleep(max(0.0, QUOTA_OUTAGE_S - (time.monotonic() - stopped_at)))
        finally:
            signal_group(deployment, quotas, signal.SIGCONT)
        resumed_at = time.monotonic()
        during = len(load.replies) - before
        await asyncio.sleep(2.0)

    failed = [(r.status, r.code, r.request_id) for r in load.replies if r.status != 200]
    assert failed == [], f"{len(failed)} of {len(load.replies)} requests of a leased key failed: {failed[:5]}"
    assert during > 20, f"only {during} requests while quota was stopped"
    for reply in newcomers:
        assert (reply.status, reply.code) == (503, "service_unavailable"), (reply.status, reply.error)
        assert reply.retry_after and int(reply.retry_after) > 0
        assert set(reply.error) >= {"message", "type", "param", "code"} and reply.error["message"]
        assert reply.at - stopped_at < QUOTA_OUTAGE_S, "the refusal waited for quota to come back"

    # Quota is back: the new key is served, and every request of the outage is charged as logged.
    async with client() as http:
        deadline = resumed_at + 20
        while (late := await chat(http, deployment.relay_url, fresh_key, model=MODEL)).status != 200:
            assert time.monotonic() < deadline, (late.status, late.error)
            await asyncio.sleep(0.2)
    served = {r.request_id for r in load.replies}

    async def unlogged() -> set[str]:
        return served - set(await books.logged([user_id]))

    await eventually(unlogged, "requests missing from the logs", timeout=30)
    await books_agree(books, deployment, [user_id, fresh_user])
    charged = await books.charges([user_id])
    assert served <= set(charged), "a served request has no ledger charge"
    assert deployment.stack.crashed() == []


# -- a relay killed mid-flight ---------------------------------------------------------------------------


@pytest.fixture
async def short_leases(
    backing: BackingServices, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Deployment, Books]]:
    """A deployment of its own (database included) whose leases expire within seconds."""
    primary, replica = backing.create_database("t_credit_relay_kill")
    await upgrade(primary)
    urls = DbUrls(primary, replica)
    with deploy_pairs(
        backing, urls, tmp_path_factory.mktemp("credit-kill-logs"), service_env=SHORT_ENV
    ) as running:
        # Two connections to the upstream per relay: further requests wait in the relay, admitted but
        # not sent, for as long as connecting may take.
        serve_flat_model(running, max_connections=2, connect_timeout_ms=60_000)
        async with Books.open(urls) as opened:
            yield running, opened


async def test_a_killed_relay_charges_nothing_in_flight_and_its_leases_expire(
    short_leases: tuple[Deployment, Books],
) -> None:
    deployment, books = short_leases
    upstream = deployment.upstream
    victim, victim_url = next(iter(deployment.more_relays.items()))
    survivor_url = deployment.relay_url
    user_id, _, key = account(deployment, 1_000 * UNIT)

    await hold_leases_everywhere(deployment, books, key, user_id, [victim_url])
    async with client() as http:
        served = [await chat(http, victim_url, key) for _ in range(3)]
        assert [r.status for r in served] == [200] * 3, [r.error for r in served]

        # Six requests admitted at once: two sent on to an upstream that will not answer before the
        # relay dies, four waiting in the relay for one of the channel's two connections.
        upstream.configure(latency_ms=60_000)
        reached = upstream.stats()["requests_total"]
        in_flight = [
            asyncio.create_task(chat(http, victim_url, key, content=f"doomed {i}")) for i in range(6)
        ]

        async def not_admitted() -> str:
            at_upstream = upstream.stats()["requests_total"] - reached
            on_lease = sum(lease.inflight for lease in await books.leases(user_id) if lease.state == "held")
            exact = UNIT * len(await books.reservations_held([user_id]))
            if at_upstream == 2 and on_lease > 0 and on_lease + exact == len(in_flight) * UNIT:
                return ""
            holds = await books.rows(
                "SELECT kind, state, phase, reserved_micros, inflight_reported_micros, created_at "
                "FROM reservations WHERE user_id = :user ORDER BY created_at",
                user=user_id,
            )
            ended = [(t.result().status, t.result().error) for t in in_flight if t.done()]
            return (
                f"{at_upstream} at the upstream, {on_lease} on the lease, {exact} held exactly; {holds}; "
                f"ended: {ended}"
            )

        await eventually(not_admitted, "the requests were not admitted", timeout=15)
        assert deployment.process(victim).kill() == -signal.SIGKILL
        doomed = await asyncio.gather(*in_flight)
        upstream.configure(latency_ms=0)
        assert {r.status for r in doomed} == {0}
        assert upstream.stats()["requests_total"] - reached == 2, "a waiting request reached the upstream"

        # The dead relay's lease expires: what it had not used is released, nothing in flight charged.
        async def still_held() -> list[LeaseRow]:
            return [lease for lease in await books.leases(user_id) if lease.state == "held"]

        await eventually(still_held, "the dead relay's lease is still held", timeout=20)
        assert any(lease.given_up for lease in await books.leases(user_id)), await books.leases(user_id)
        await settled_to(deployment, user_id, (997 * UNIT, 0), timeout=20)
        charged = await books.charges([user_id])
        # The warm-up requests failed upstream and were charged 0; the three served ones one unit each.
        assert {rid: cost for rid, cost in charged.items() if cost} == {r.request_id: UNIT for r in served}

        # The key is still served by the surviving relay.
        after = await chat(http, survivor_url, key)
        assert after.status == 200, after.error

    await books_agree(books, deployment, [user_id])
    admitted_on = await books.lease_ids([r.request_id for r in served])
    assert len(admitted_on) == 3 and all(admitted_on), f"not admitted on the lease: {admitted_on}"
    assert deployment.stack.crashed() == [victim]


# -- a randomized workload -------------------------------------------------------------------------------


async def test_a_seeded_random_workload_keeps_ledger_equal_to_logs(
    deployment: Deployment, books: Books
) -> None:
    rng = random.Random(RANDOM_SEED)
    context = f"RELAYGATE_CREDIT_E2E_SEED={RANDOM_SEED}"
    upstream = deployment.upstream
    keys: list[str] = []
    users: list[str] = []
    # A well-funded user with two keys (one with a small daily budget), a user that runs dry, and a
    # user whose key has an RPM limit (the exact path).
    rich, _, plain = account(deployment, 50_000_000)
    budget_key_id = ""
    with deployment.admin() as admin:
        created = ok(
            admin.post(
                "/admin/v1/keys",
                json={"user_id": rich, "name": "budget", "limits": {"daily_budget_micros": 6 * UNIT}},
            )
        )
        budget_key_id = str(created["key"]["key_id"])
    poor, _, poor_key = account(deployment, 8 * UNIT)
    limited, _, limited_key = account(deployment, 50_000_000, limits={"rpm": 30})
    keys += [plain, str(created["api_key"]), poor_key, limited_key]
    users += [rich, poor, limited]
    replies: list[Reply] = []

    async with client() as http:
        for _ in range(12):
            fault = rng.random()
            if fault < 0.25:
                upstream.configure(fail_status=rng.choice([502, 503, 429]), fail_count=rng.randrange(1, 4))
            elif fault < 0.4:
                upstream.configure(drop_after_chunks=rng.randrange(1, 4), fail_count=rng.randrange(1, 3))
            elif fault < 0.5:
                upstream.configure(omit_usage=True)
            batch = []
            for n in range(16):
                model = rng.choice([MODEL, MODEL, FLAT_MODEL])
                batch.append(
                    chat(
                        http,
                        rng.choice(deployment.relay_urls),
                        rng.choice(keys),
                        model=model,
                        stream=rng.random() < 0.5,
                        max_tokens=rng.randrange(1, 24),
                        content=" ".join("w" for _ in range(rng.randrange(1, 40))) + f" {n}",
                    )
                )
            replies += await asyncio.gather(*batch)
            upstream.reset()

    statuses = collections.Counter(r.status for r in replies)
    assert 500 not in statuses and 0 not in statuses, (context, statuses)
    assert statuses[200] > 60 and sum(v for s, v in statuses.items() if s == 429) > 0, (context, statuses)
    served = {r.request_id for r in replies if r.status == 200}

    async def unlogged() -> set[str]:
        return served - set(await books.logged(users))

    await eventually(unlogged, f"{context}: requests missing from the logs", timeout=30)
    await books_agree(books, deployment, users)
    admitted_on = collections.Counter(bool(lease) for lease in await books.lease_ids(sorted(served)))
    assert admitted_on[True] > 0 and admitted_on[False] > 0, f"{context}: leased and exact {admitted_on}"
    budgets = admin_get(deployment, f"/admin/v1/budgets/key/{budget_key_id}", consistent="true")["budgets"]
    day = next(b for b in budgets if b["period"] == "day")
    assert int(day.get("spent_micros", 0)) <= 6 * UNIT, (context, day)
    for user in users:
        total, held = balance_of(deployment, user)
        assert total >= held >= 0, (context, user, total, held)
