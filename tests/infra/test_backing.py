"""The backing-services harness itself: replication, failure injection, isolation helpers, cleanup."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import astuple
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from devinfra.backing import BackingServices, missing_binaries
from devinfra.kafka import KAFKA_VERSION, KafkaBroker, KafkaError
from devinfra.postgres import PostgresError, psql
from devinfra.processes import LOOPBACK, InfraError, free_ports, port_accepts


def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes; return its last result."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def redis_ping(port: int) -> bytes:
    with socket.create_connection((LOOPBACK, port), timeout=2) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(64)


@pytest.fixture(scope="module")
def table(backing: BackingServices) -> str:
    """A table on the primary, already replicated; rows are tagged with unique values per test."""
    psql(backing.pg_primary_dsn, "CREATE TABLE IF NOT EXISTS harness_rows (tag text PRIMARY KEY)")
    backing.wait_for_replica()
    return "harness_rows"


def insert_tag(backing: BackingServices, table: str) -> str:
    tag = uuid.uuid4().hex
    psql(backing.pg_primary_dsn, f"INSERT INTO {table} (tag) VALUES ('{tag}')")
    return tag


def replica_has(backing: BackingServices, table: str, tag: str) -> bool:
    return psql(backing.pg_replica_dsn, f"SELECT count(*) FROM {table} WHERE tag = '{tag}'") == "1"


def test_replica_streams_writes_from_primary(backing: BackingServices, table: str) -> None:
    assert psql(backing.pg_primary_dsn, "SELECT pg_is_in_recovery()") == "f"
    assert psql(backing.pg_replica_dsn, "SELECT pg_is_in_recovery()") == "t"
    assert psql(backing.pg_primary_dsn, "SELECT state FROM pg_stat_replication") == "streaming"

    tag = insert_tag(backing, table)

    assert eventually(lambda: replica_has(backing, table, tag))


def test_replica_rejects_writes(backing: BackingServices, table: str) -> None:
    with pytest.raises(PostgresError, match="read-only transaction"):
        psql(backing.pg_replica_dsn, f"INSERT INTO {table} (tag) VALUES ('nope')")


def test_paused_replay_hides_new_rows_until_resumed(backing: BackingServices, table: str) -> None:
    backing.pause_replica_replay()
    try:
        tag = insert_tag(backing, table)
        time.sleep(0.3)
        assert not replica_has(backing, table, tag)
    finally:
        backing.resume_replica_replay()

    assert eventually(lambda: replica_has(backing, table, tag))


def test_replica_restart_catches_up(backing: BackingServices, table: str) -> None:
    backing.stop_replica()
    try:
        with pytest.raises(PostgresError):
            psql(backing.pg_replica_dsn, "SELECT 1")
        tag = insert_tag(backing, table)
    finally:
        backing.start_replica()

    assert eventually(lambda: replica_has(backing, table, tag))


def test_redis_answers_and_restarts_on_same_port(backing: BackingServices) -> None:
    port = backing.ports.redis
    assert redis_ping(port) == b"+PONG\r\n"

    backing.stop_redis()
    with pytest.raises(ConnectionRefusedError):
        redis_ping(port)

    backing.start_redis()
    assert backing.ports.redis == port
    assert redis_ping(port) == b"+PONG\r\n"


def test_create_database_returns_isolated_working_dsns(backing: BackingServices) -> None:
    name = f"harness_{uuid.uuid4().hex[:12]}"

    primary_dsn, replica_dsn = backing.create_database(name)

    assert primary_dsn == f"postgresql://postgres@127.0.0.1:{backing.ports.pg_primary}/{name}"
    assert replica_dsn == f"postgresql://postgres@127.0.0.1:{backing.ports.pg_replica}/{name}"
    psql(primary_dsn, "CREATE TABLE only_here (x int); INSERT INTO only_here VALUES (42)")
    assert eventually(lambda: psql(replica_dsn, "SELECT to_regclass('only_here') IS NOT NULL") == "t")
    assert psql(replica_dsn, "SELECT x FROM only_here") == "42"
    assert psql(backing.pg_primary_dsn, "SELECT to_regclass('only_here') IS NULL") == "t"


def test_create_database_rejects_unsafe_names(backing: BackingServices) -> None:
    with pytest.raises(ValueError, match="database name"):
        backing.create_database('x"; DROP DATABASE postgres; --')


def test_env_names_every_service(backing: BackingServices) -> None:
    assert backing.env() == {
        "RELAYGATE_TEST_PG_PRIMARY": backing.pg_primary_dsn,
        "RELAYGATE_TEST_PG_REPLICA": backing.pg_replica_dsn,
        "RELAYGATE_TEST_REDIS_URL": f"redis://127.0.0.1:{backing.ports.redis}/0",
        "RELAYGATE_TEST_KAFKA_BOOTSTRAP": f"127.0.0.1:{backing.ports.kafka}",
    }


def test_stop_kills_everything_and_is_idempotent(backing: BackingServices) -> None:
    # A second, private set: stopping the session's set would break the other tests.
    services = BackingServices().start()
    try:
        ports = astuple(services.ports)
        base_dir = services.base_dir
        assert all(port_accepts(port) for port in ports)
    finally:
        services.stop()
    services.stop()

    assert not any(port_accepts(port) for port in ports)
    assert not base_dir.exists()
    with pytest.raises(InfraError, match="not started"):
        _ = services.redis_url


async def records(bootstrap: str, topic: str) -> list[bytes]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        batches = await consumer.getmany(timeout_ms=3000)
        return [record.value for batch in batches.values() for record in batch]
    finally:
        await consumer.stop()


async def test_an_erased_kafka_comes_back_empty_on_the_same_port(backing: BackingServices) -> None:
    # That a stopped or killed broker keeps its log is tests/logger/test_broker_restart.py's subject.
    topic = f"harness-{uuid.uuid4().hex[:8]}"
    producer = AIOKafkaProducer(
        bootstrap_servers=backing.kafka_bootstrap, acks="all", enable_idempotence=True
    )
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"gone")
    finally:
        await producer.stop()
    port = backing.ports.kafka

    backing.erase_kafka()
    assert not port_accepts(port)
    backing.start_kafka()

    assert backing.ports.kafka == port
    assert await records(backing.kafka_bootstrap, topic) == []


def test_missing_kafka_jars_are_named_and_refuse_a_start(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Under RELAYGATE_REQUIRE_INFRA=1 the session fixture turns a non-empty list into a failure.
    home = tmp_path / "nothing-fetched"
    monkeypatch.setenv("RELAYGATE_KAFKA_HOME", str(home))

    assert f"Apache Kafka {KAFKA_VERSION} jars in {home / 'lib'}" in missing_binaries()
    with pytest.raises(KafkaError, match=r"python -m devinfra\.kafka fetch"):
        KafkaBroker(tmp_path / "broker", *free_ports(2)).start()
