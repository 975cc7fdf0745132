"""Faults must not make the books disagree.

Steady traffic from a few keys (streams and not) runs against the four services as processes while,
in turn, quota, auth, the logger and the relay are killed (SIGKILL) or stopped (SIGTERM) and started
again, and the broker, Redis and the replica are stopped and started. Afterwards:

* no answer was a 500, and every 5xx came inside a fault window (from the fault until a few seconds
  after the service answered again) and was a 503 with ``Retry-After`` (or a relay that was down);
* the books reconcile, and nothing is left held once the settle retries and the TTL have passed;
* per request id, what the ledger charged equals the cost in ``request_logs`` (a request with no log
  row was charged nothing), and no more requests were charged than reached the fake upstream;
* requests refused before the key was known are in the log too, without a principal.
"""

from __future__ import annotations

import asyncio
import collections
import signal
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from devinfra.backing import BackingServices
from devinfra.processes import ManagedProcess
from services.common.config import normalize_database_url
from services.stack import LocalStack
from tests.db_fixtures import DbUrls
from tests.e2e.stack import MODEL, Deployment, deploy, fund_user

# Short enough that expiries happen within the test (the wait for the last holds is about one TTL);
# the settle retries give up well before the TTL, which still outlasts any request here (8 tokens, at
# most one RPC timeout per call). Drains and shutdowns are bounded short: each SIGTERM waits for them.
SERVICE_ENV = {
    "RELAYGATE_RESERVATION_TTL_S": "6",
    "RELAYGATE_EXPIRY_SWEEP_INTERVAL_S": "0.5",
    "RELAYGATE_GRPC_DRAIN_SECONDS": "1",
    "RELAYGATE_RPC_TIMEOUT_S": "1.5",
    "RELAYGATE_SETTLE_RETRY_S": "3",
    "RELAYGATE_SETTLE_SHUTDOWN_S": "3",
    "RELAYGATE_REPLICA_CHECK_INTERVAL_S": "0.5",
}
# After a service answers again, clients may still meet it being found again (gRPC reconnect
# backoff, the replica monitor, the broker's metadata): 5xx this long after a fault still count in it.
SETTLE_S = 4.0
KEYS = 3
WORKERS = 4


@pytest.fixture(scope="module")
def deployment(
    backing: BackingServices, migrated_db: DbUrls, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    with pytest.MonkeyPatch.context() as patch:
        # Every service process (and every restart of one) inherits these.
        for name, value in SERVICE_ENV.items():
            patch.setenv(name, value)
        with deploy(backing, migrated_db, tmp_path_factory.mktemp("fault-logs")) as running:
            yield running


@dataclass
class Answer:
    started: float
    ended: float
    status: int  # 0: the connection failed or was cut (the relay was down)
    request_id: str
    stream: bool
    retry_after: str | None


class Traffic:
    """Workers sending chat requests (every other one streamed) until stopped; every answer kept."""

    def __init__(self, url: str, keys: list[str]) -> None:
        self._url = url
        self._keys = keys
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.answers: list[Answer] = []
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(WORKERS)]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _run(self, worker: int) -> None:
        key = self._keys[worker % len(self._keys)]
        n = 0
        with httpx.Client(timeout=15, headers={"authorization": f"Bearer {key}"}) as client:
            while not self._stop.is_set():
                n += 1
                stream = n % 2 == 0
                body = {
                    "model": MODEL,
                    "messages": [{"role": "user", "content": f"fault run {worker} {n}"}],
                    "max_tokens": 8,
                    "stream": stream,
                }
                started = time.monotonic()
                status, request_id, retry_after = 0, "", None
                try:
                    with client.stream("POST", f"{self._url}/v1/chat/completions", json=body) as response:
                        status = response.status_code
                        request_id = response.headers.get("x-request-id", "")
                        retry_after = response.headers.get("retry-after")
                        for _ in response.iter_bytes():
                            pass
                except httpx.HTTPError:
                    status = status if status and not stream else 0
                with self._lock:
                    self.answers.append(
                        Answer(started, time.monotonic(), status, request_id, stream, retry_after)
                    )
                time.sleep(0.01)

    def count(self) -> int:
        with self._lock:
            return len(self.answers)


class Faults:
    """Injects faults one at a time and remembers when each one could be seen by clients."""

    def __init__(self, stack: LocalStack, backing: BackingServices) -> None:
        self._stack = stack
        self._backing = backing
        self.windows: list[tuple[str, float, float]] = []

    def inject(self, name: str, fault: Callable[[], None]) -> None:
        started = time.monotonic()
        fault()
        self.windows.append((name, started, time.monotonic() + SETTLE_S))
        time.sleep(0.5)  # steady traffic between faults (a restart alone is seconds of it)

    def bounce(self, service: str, sig: signal.Signals) -> None:
        """Stop ``service`` with ``sig``, then start it again on the same port with the same settings."""
        stack = self._stack
        old = next(p for p in stack.processes if p.name == service)
        old.send(sig, timeout=30)
        time.sleep(0.2)
        env = stack.process_env(service, stack.extra_env.get(service, {}))
        new = ManagedProcess(
            service, [sys.executable, "-m", f"services.{service}"], old.log_path, env=env, port=old.port
        )
        stack.processes[stack.processes.index(old)] = new
        new.wait_listening(timeout=60)

    def outage(self, stop: Callable[[], None], start: Callable[[], None], seconds: float = 2.0) -> None:
        stop()
        try:
            time.sleep(seconds)
        finally:
            start()


class Books:
    """Reads the ledger and the request logs straight from the primary."""

    def __init__(self, db: DbUrls) -> None:
        self._url = normalize_database_url(db.primary)

    async def query(self, sql: str, **params: object) -> list[tuple[object, ...]]:
        engine = create_async_engine(self._url)
        try:
            async with engine.connect() as conn:
                return [tuple(row) for row in await conn.execute(text(sql), params)]
        finally:
            await engine.dispose()

    async def reservations(self, users: list[str]) -> dict[str, tuple[str, int]]:
        """Per request id: its hold's state and what the ledger made of it (its charge entry: charged
        plus written off, which is what the request cost). A lease is one hold for many requests: its
        rows stand for it while held, and each request charged on it (or logged as admitted on it)
        appears under its own id, state ``leased``."""
        rows = await self.query(
            "SELECT id, state, kind FROM reservations WHERE user_id = ANY(:users)",
            users=users,
        )
        found = {str(r[0]): (str(r[1]), 0) for r in rows if r[2] == "reservation" or r[1] == "held"}
        logged = await self.query(
            "SELECT event_id FROM request_logs WHERE user_id = ANY(:users) AND lease_id <> ''", users=users
        )
        found.update({str(r[0]): ("leased", 0) for r in logged})
        charges = await self.query(
            "SELECT reservation_id, written_off_micros - amount_micros FROM ledger_entries"
            " WHERE kind = 'charge' AND user_id = ANY(:users)",
            users=users,
        )
        for rid, cost in ((str(r[0]), int(str(r[1]))) for r in charges):
            found[rid] = (found.get(rid, ("leased", 0))[0], cost)
        return found

    async def logged(self, ids: list[str]) -> dict[str, tuple[int, str]]:
        rows = await self.query(
            "SELECT event_id, cost_micros, channel_id FROM request_logs WHERE event_id = ANY(:ids)", ids=ids
        )
        return {str(r[0]): (int(str(r[1])), str(r[2])) for r in rows}


def disagreements(ledger: dict[str, tuple[str, int]], logged: dict[str, tuple[int, str]]) -> list[str]:
    """Request ids whose ledger charge differs from the logged cost (no log row: cost 0)."""
    found = []
    for rid, (state, charged) in sorted(ledger.items()):
        cost = logged.get(rid, (0, ""))[0]
        if charged != cost:
            found.append(f"{rid}: {state} charged {charged}, logged {cost if rid in logged else 'nothing'}")
    return found


async def wait_for(check: Callable[[], Awaitable[object]], what: str, timeout: float) -> None:
    """Wait until ``check`` returns something empty; fail with what it last returned."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if not result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} after {timeout:g}s: {result}")
        await asyncio.sleep(0.2)


async def test_faults_do_not_make_the_books_disagree(
    deployment: Deployment, backing: BackingServices
) -> None:
    stack, upstream = deployment.stack, deployment.upstream
    funded = [fund_user(deployment, 1_000_000_000) for _ in range(KEYS)]
    users, keys = [u for u, _ in funded], [k for _, k in funded]
    upstream_before = upstream.stats()["requests_total"]
    faults = Faults(stack, backing)

    with Traffic(deployment.relay_url, keys) as traffic:
        time.sleep(1.0)
        faults.inject("quota SIGTERM", lambda: faults.bounce("quota", signal.SIGTERM))
        faults.inject("quota SIGKILL", lambda: faults.bounce("quota", signal.SIGKILL))
        faults.inject("auth SIGKILL", lambda: faults.bounce("auth", signal.SIGKILL))
        faults.inject("auth SIGTERM", lambda: faults.bounce("auth", signal.SIGTERM))
        faults.inject("logger SIGKILL", lambda: faults.bounce("logger", signal.SIGKILL))
        faults.inject("logger SIGTERM", lambda: faults.bounce("logger", signal.SIGTERM))
        faults.inject("relay SIGTERM", lambda: faults.bounce("relay", signal.SIGTERM))
        faults.inject("relay SIGKILL", lambda: faults.bounce("relay", signal.SIGKILL))
        faults.inject("broker", lambda: faults.outage(backing.stop_kafka, backing.start_kafka))
        faults.inject("redis", lambda: faults.outage(backing.stop_redis, backing.start_redis))
        faults.inject("replica", lambda: faults.outage(backing.stop_replica, backing.start_replica))
        time.sleep(1.0)

    answers = traffic.answers
    ok = [a for a in answers if a.status == 200]
    assert len(ok) > 50, f"too little traffic got through: {len(ok)} of {len(answers)}"

    # No 500 at all; 5xx only inside fault windows, and then a 503 that says when to retry.
    def in_window(answer: Answer) -> str:
        for name, start, end in faults.windows:
            if answer.started <= end and answer.ended >= start:
                return name
        return ""

    server_errors = [a for a in answers if a.status >= 500]
    assert [a for a in server_errors if a.status == 500] == []
    outside = [(a.status, a.request_id, a.started) for a in server_errors if not in_window(a)]
    assert outside == [], f"5xx outside the fault windows: {outside}"
    assert all(a.status == 503 and a.retry_after for a in server_errors if not a.stream), [
        (a.status, a.retry_after, in_window(a)) for a in server_errors
    ]
    assert not [a for a in answers if a.status == 0 and not in_window(a)], "the relay refused connections"

    # Refusals before the key is known are logged too.
    bad = httpx.post(
        f"{deployment.relay_url}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "who am I"}]},
        headers={"authorization": f"Bearer rg-{uuid.uuid4().hex}"},
        timeout=10,
    )
    assert bad.status_code == 401

    books = Books(deployment.db)

    # Settle retries end within RELAYGATE_SETTLE_RETRY_S; what they gave up expires after the TTL.
    async def still_held() -> list[str]:
        return [rid for rid, (state, _) in (await books.reservations(users)).items() if state == "held"]

    await wait_for(still_held, "reservations still held", timeout=40)

    # A usage event may still be on its way (a late charge after its hold expired): read both again.
    async def disagreeing() -> list[str]:
        books_now = await books.reservations(users)
        return disagreements(books_now, await books.logged(list(books_now)))

    await wait_for(disagreeing, "ledger and request logs disagree", timeout=90)
    ledger = await books.reservations(users)
    logged = await books.logged(list(ledger))
    charged = [rid for rid, (_, amount) in ledger.items() if amount > 0]
    # Nothing was charged that never reached the upstream.
    assert all(logged[rid][1] for rid in charged), "a charged request was logged without a channel"
    reached = upstream.stats()["requests_total"] - upstream_before
    assert len(charged) <= reached, (len(charged), reached)

    refused_id = bad.headers["x-request-id"]
    await wait_for(
        lambda: _missing_refusal(books, refused_id),
        "the refused request is not in the log",
        timeout=30,
    )

    states = collections.Counter(state for state, _ in ledger.values())
    print(
        f"faults: {len(answers)} answers, {len(ok)} ok, "
        f"{collections.Counter(a.status for a in answers if a.status != 200)} others; "
        f"reservations {dict(states)}, charged {len(charged)}, upstream saw {reached}"
    )
    with deployment.admin() as admin:
        reconcile = admin.get("/admin/v1/reconcile", params={"consistent": "true"}, timeout=60)
    assert reconcile.status_code == 200, reconcile.text
    assert reconcile.json().get("discrepancies", []) == []
    assert stack.crashed() == []


async def _missing_refusal(books: Books, request_id: str) -> bool:
    rows = await books.query(
        "SELECT event_id FROM request_logs WHERE event_id = :id AND key_id = '' AND status_code = 401",
        id=request_id,
    )
    return not rows
