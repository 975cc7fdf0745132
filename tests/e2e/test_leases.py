"""Credit leases through the whole deployment: a funded key's first request is reserved exactly, the
ones after it are admitted on the relay's lease with no quota RPC, each usage event carries the cost
the ledger charges, a key with an RPM limit stays exact, fifty keys of one user used once or twice
each share one lease, and a relay stopped with SIGTERM gives its lease back.

Which path admitted a request shows in its answer: only an exact reservation tells the caller the
available balance (``x-relaygate-available-micros``).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from services.common.config import normalize_database_url
from tests.e2e.stack import MODEL, PRICE, Deployment, fund_user, ok

AVAILABLE = "x-relaygate-available-micros"
# Syncs every 200 ms instead of every second: the first lease is granted within a few tenths.
SYNC_MS = "200"


@pytest.fixture(scope="module")
def relay_env() -> dict[str, str]:
    return {"RELAYGATE_CREDIT_SYNC_INTERVAL_MS": SYNC_MS}


def chat(url: str, key: str, text_: str = "hello") -> httpx.Response:
    response = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": text_}], "max_tokens": 16},
        headers={"authorization": f"Bearer {key}"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return response


def cost_of(response: httpx.Response) -> int:
    usage = response.json()["usage"]
    micro = (
        usage["prompt_tokens"] * PRICE["input_per_mtok"]
        + usage["completion_tokens"] * PRICE["output_per_mtok"]
    )
    return int(-(-micro // 1_000_000))


def until(check: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def holds(deployment: Deployment, user_id: str) -> dict[str, dict[str, Any]]:
    with deployment.admin() as admin:
        listing = ok(admin.get(f"/admin/v1/users/{user_id}/reservations", params={"consistent": "true"}))
    return {str(r["reservation_id"]): r for r in listing.get("reservations", [])}


def leased_requests(url: str, key: str, count: int) -> tuple[list[httpx.Response], list[httpx.Response]]:
    """Requests until ``count`` were admitted on the key's lease; returns (exact, leased) answers."""
    exact: list[httpx.Response] = []
    leased: list[httpx.Response] = []
    deadline = time.monotonic() + 20
    while len(leased) < count:
        assert time.monotonic() < deadline, f"only {len(leased)} of {count} requests were leased"
        response = chat(url, key)
        if AVAILABLE in response.headers:
            assert not leased, "a key that had a lease went back to exact reservations"
            exact.append(response)
            time.sleep(0.1)
        else:
            leased.append(response)
    return exact, leased


def test_after_the_first_request_a_funded_key_is_admitted_on_one_lease(deployment: Deployment) -> None:
    user_id, key = fund_user(deployment, 50_000_000)
    exact, leased = leased_requests(deployment.relay_url, key, 10)

    assert exact, "the key's first request has no lease to be admitted on"
    for response in leased:
        assert not any(name.startswith("x-ratelimit-") for name in response.headers)
    found = holds(deployment, user_id)
    exact_ids = {r.headers["x-request-id"] for r in exact}
    # Quota saw a Reserve for the exact requests only, and one lease hold for all the others.
    assert exact_ids <= set(found)
    [lease] = [hold for rid, hold in found.items() if rid not in exact_ids]
    assert lease["state"] == "held"
    assert not {r.headers["x-request-id"] for r in leased} & set(found)


def exact_admissions(url: str) -> float:
    """The relay's count of requests it sent quota a Reserve for."""
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    found = [
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("relaygate_relay_credit_admissions_total{") and 'path="exact"' in line
    ]
    return sum(found)


def test_fifty_keys_of_one_user_used_once_or_twice_share_one_lease(deployment: Deployment) -> None:
    user_id, first_key = fund_user(deployment, 50_000_000)
    with deployment.admin() as admin:
        keys = [first_key] + [
            str(ok(admin.post("/admin/v1/keys", json={"user_id": user_id, "name": f"rot-{n}"}))["api_key"])
            for n in range(49)
        ]
    exact_before = exact_admissions(deployment.relay_url)
    responses: list[httpx.Response] = []
    for index, key in enumerate(keys):
        responses.append(chat(deployment.relay_url, key))
        if index % 2:
            responses.append(chat(deployment.relay_url, key))
    exact = [r for r in responses if AVAILABLE in r.headers]
    leased = [r for r in responses if AVAILABLE not in r.headers]
    # The user's first requests go exact while its shared lease is asked for (one sync, 200 ms);
    # every key after that, each new to the relay, is admitted on it.
    assert len(exact) <= 10, f"{len(exact)} of {len(responses)} requests were reserved exactly"
    assert responses.index(leased[0]) == len(exact), "a request went exact after the lease opened"
    # Reserve RPCs, counted by the relay and by quota's own records (each Reserve here held a row).
    assert exact_admissions(deployment.relay_url) - exact_before == len(exact)
    found = holds(deployment, user_id)
    exact_ids = {r.headers["x-request-id"] for r in exact}
    assert exact_ids <= set(found)
    # One lease for all 50 keys' leased requests: the user's, with no key of its own.
    [lease] = [hold for rid, hold in found.items() if rid not in exact_ids]
    assert lease["state"] == "held" and not lease.get("key_id"), lease
    assert len(found) == len(exact) + 1


def test_a_key_with_an_rpm_limit_stays_exact(deployment: Deployment) -> None:
    user_id, key = fund_user(deployment, 50_000_000, limits={"rpm": 1000})
    responses = []
    for _ in range(6):
        responses.append(chat(deployment.relay_url, key))
        time.sleep(0.2)
    for response in responses:
        assert AVAILABLE in response.headers
        assert response.headers["x-ratelimit-limit-requests"] == "1000"
    assert set(holds(deployment, user_id)) == {r.headers["x-request-id"] for r in responses}


class Books:
    """The ledger's charges and the logged costs, per request id, read from the primary."""

    def __init__(self, deployment: Deployment) -> None:
        self._url = normalize_database_url(deployment.db.primary)

    async def _rows(self, sql: str, ids: list[str]) -> dict[str, int]:
        engine = create_async_engine(self._url)
        try:
            async with engine.connect() as conn:
                return {str(r[0]): int(r[1]) for r in await conn.execute(text(sql), {"ids": ids})}
        finally:
            await engine.dispose()

    async def charged(self, ids: list[str]) -> dict[str, int]:
        return await self._rows(
            "SELECT reservation_id, -amount_micros FROM ledger_entries"
            " WHERE kind = 'charge' AND reservation_id = ANY(:ids)",
            ids,
        )

    async def logged(self, ids: list[str]) -> dict[str, int]:
        return await self._rows(
            "SELECT event_id, cost_micros FROM request_logs WHERE event_id = ANY(:ids)", ids
        )


async def test_every_leased_request_is_charged_what_its_usage_event_logged(deployment: Deployment) -> None:
    _, key = fund_user(deployment, 50_000_000)
    _, leased = leased_requests(deployment.relay_url, key, 8)
    ids = [r.headers["x-request-id"] for r in leased]
    expected = {r.headers["x-request-id"]: cost_of(r) for r in leased}
    books = Books(deployment)

    deadline = time.monotonic() + 30
    while True:
        charged, logged = await books.charged(ids), await books.logged(ids)
        if len(charged) == len(logged) == len(ids) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.3)
    assert logged == expected
    assert charged == logged


def test_a_relay_stopped_gives_its_lease_back(deployment: Deployment) -> None:
    stack = deployment.stack
    name = f"relay-{len(stack.processes)}"
    url = stack.add_relay()
    user_id, key = fund_user(deployment, 50_000_000)
    exact, leased = leased_requests(url, key, 5)
    exact_ids = {r.headers["x-request-id"] for r in exact}
    [lease_id] = [rid for rid in holds(deployment, user_id) if rid not in exact_ids]
    held = holds(deployment, user_id)[lease_id]
    used = sum(cost_of(r) for r in leased)
    assert int(held.get("reserved_micros", 0)) > used

    # Its log's last lines time each shutdown step: what a relay that was killed instead waited for.
    assert stack.stop_service(name, signal.SIGTERM) in (0, -signal.SIGTERM), stack.shutdown_log(name)

    # What the lease still holds plus what its events charged is what its requests cost: the unused
    # part went back to the balance (charges may still be on their way from the usage topic).
    def shrunk() -> dict[str, Any] | None:
        hold = holds(deployment, user_id)[lease_id]
        kept = int(hold.get("reserved_micros", 0)) + int(hold.get("charged_micros", 0))
        return hold if kept == used else None

    until(shrunk, "the lease to shrink to what was used")
