"""Kafka goes away under traffic: responses keep flowing, usage events wait in the relay's spool, and
once the broker is back (with its log) every event reaches the log table exactly once. A relay stopped
while the broker is down hands its spool to the next one."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from devinfra.backing import BackingServices
from services.common.config import normalize_database_url
from tests.db_fixtures import DbUrls
from tests.e2e.stack import MODEL, Deployment, fund_user


class Traffic:
    """Requests in a background thread; remembers the request id of every answer."""

    def __init__(self, url: str, key: str, workers: int = 3) -> None:
        self._url = url
        self._key = key
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.ids: list[str] = []
        self.failures: list[str] = []
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(workers)]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)

    def _run(self) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "keep going"}], "max_tokens": 2}
        with httpx.Client(timeout=10, headers={"authorization": f"Bearer {self._key}"}) as client:
            while not self._stop.is_set():
                response = client.post(f"{self._url}/v1/chat/completions", json=body)
                with self._lock:
                    if response.status_code == 200:
                        self.ids.append(response.headers["x-request-id"])
                    else:
                        self.failures.append(f"{response.status_code} {response.text[:200]}")
                time.sleep(0.02)

    def count(self) -> int:
        with self._lock:
            return len(self.ids)


async def logged_counts(db: DbUrls, ids: list[str]) -> dict[str, int]:
    engine = create_async_engine(normalize_database_url(db.primary))
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                text(
                    "SELECT event_id, count(*) FROM request_logs WHERE event_id = ANY(:ids) GROUP BY event_id"
                ),
                {"ids": ids},
            )
            return {str(event_id): int(count) for event_id, count in rows}
    finally:
        await engine.dispose()


async def wait_logged(db: DbUrls, ids: list[str], timeout: float = 150.0) -> dict[str, int]:
    """Wait until every id is in request_logs. Generous: after a broker restart the logger's consumer
    can take minutes to commit again (aiokafka retries the commit against the new broker)."""
    deadline = time.monotonic() + timeout
    while True:
        counts = await logged_counts(db, ids)
        if len(counts) == len(ids) or time.monotonic() > deadline:
            return counts
        time.sleep(0.5)


async def test_responses_flow_while_kafka_is_down_and_every_event_is_logged_once(
    deployment: Deployment, broker: BackingServices
) -> None:
    _, key = fund_user(deployment, 100_000_000)
    with Traffic(deployment.relay_url, key) as traffic:
        time.sleep(1.0)
        before_outage = traffic.count()
        broker.stop_kafka()
        time.sleep(3.0)
        during_outage = traffic.count() - before_outage
        broker.start_kafka()
        time.sleep(2.0)
    counts = await wait_logged(deployment.db, traffic.ids)
    missing = set(traffic.ids) - set(counts)
    assert traffic.failures == []
    assert before_outage > 0 and during_outage > 10, (before_outage, during_outage)

    assert not missing, f"{len(missing)} of {len(traffic.ids)} events never reached the log"
    assert set(counts.values()) == {1}


async def test_a_relay_stopped_during_the_outage_leaves_its_spool_to_the_next(
    deployment: Deployment, broker: BackingServices
) -> None:
    _, key = fund_user(deployment, 100_000_000)
    second = deployment.stack.add_relay()
    broker.stop_kafka()
    with Traffic(second, key, workers=2) as traffic:
        time.sleep(2.0)
    assert traffic.failures == [] and traffic.count() > 10
    # SIGTERM: the relay drains and writes what Kafka did not take to its spool (uvicorn re-raises
    # the signal once its graceful shutdown is done).
    stopped = deployment.stack.processes[-1]
    # Its log's last lines time each shutdown step: what a relay that was killed instead waited for.
    code = deployment.stack.stop_service(stopped.name)
    assert code in (0, -signal.SIGTERM), deployment.stack.shutdown_log(stopped.name)
    assert list(Path(deployment.stack.env["RELAYGATE_EVENT_SPOOL_DIR"]).rglob("*.seg"))

    broker.start_kafka()
    deployment.stack.add_relay()  # adopts the stopped relay's spool
    counts = await wait_logged(deployment.db, traffic.ids)
    assert set(counts) == set(traffic.ids)
    assert set(counts.values()) == {1}
