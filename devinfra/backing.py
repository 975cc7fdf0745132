"""All backing services of one test session or benchmark run: PostgreSQL primary + streaming replica,
Redis and Apache Kafka, on free loopback ports in a fresh temporary directory.

Usage::

    with BackingServices() as services:
        os.environ.update(services.env())
        ...

Concurrent runs, and servers already listening on the default ports, cannot collide. ``stop()`` stops
every process that was started and removes the directory. ``python -m devinfra.backing`` keeps a set
running until Ctrl-C, for manual use.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType

from devinfra.kafka import KafkaBroker, missing_kafka
from devinfra.postgres import PostgresPair, missing_pg_tools, pg_dsn
from devinfra.processes import LOOPBACK, InfraError, ManagedProcess, free_ports

__all__ = ["SETUP_HINT", "BackingServices", "Ports", "missing_binaries"]

SETUP_HINT = "run: bash tests/infra/setup.sh"


def missing_binaries() -> list[str]:
    """The server binaries (and Kafka jars) the backing services need but cannot find."""
    missing = missing_pg_tools()
    if shutil.which("redis-server") is None:
        missing.append("redis-server")
    return missing + missing_kafka()


@dataclass(frozen=True)
class Ports:
    """Loopback ports of one run."""

    pg_primary: int
    pg_replica: int
    redis: int
    kafka: int
    kafka_controller: int


class BackingServices:
    """PostgreSQL primary + replica, Redis and a Kafka broker, on free loopback ports in a temp directory.

    ``start()`` brings everything up and returns once every server is ready (3-7 s, depending on the
    load; Kafka's JVM is the slowest); ``stop()`` stops it all and deletes the directory. ``stop()`` is
    idempotent and also runs when ``start()`` fails half-way, so no process outlives a failed start.

    Redis keeps nothing: ``stop_redis()``/``start_redis()`` bring back an *empty* server on the same
    port. Kafka keeps its log: ``stop_kafka()`` (clean) or ``kill_kafka()`` (crash) then
    ``start_kafka()`` bring back the same broker with its topics, records and committed offsets.
    """

    def __init__(self, *, start_timeout: float = 90.0) -> None:
        self.start_timeout = start_timeout
        self._base: Path | None = None
        self._ports: Ports | None = None
        self._postgres: PostgresPair | None = None
        self._redis: ManagedProcess | None = None
        self._kafka: KafkaBroker | None = None

    # -- lifecycle --

    def start(self) -> BackingServices:
        """Start all services and wait until each is ready; return ``self``.

        Raises :class:`~devinfra.processes.InfraError` (after cleaning up) when a binary is missing or a
        service fails to start; the message includes the end of that service's log.
        """
        if self._base is not None:
            raise InfraError("already started")
        if missing := missing_binaries():
            raise InfraError(f"missing: {', '.join(missing)}; {SETUP_HINT}")
        self._base = Path(tempfile.mkdtemp(prefix="relaygate-infra-"))
        try:
            if os.geteuid() == 0:
                # PostgreSQL runs as the postgres user, which must traverse this 0700 directory.
                self._base.chmod(0o711)
            ports = self._ports = Ports(*free_ports(5))
            # Redis and the JVM boot while PostgreSQL runs initdb and the base backup.
            self._redis = self._spawn_redis()
            self._kafka = KafkaBroker(self._base / "kafka", ports.kafka, ports.kafka_controller)
            self._kafka.launch()
            self._postgres = PostgresPair(
                self._base / "pg", ports.pg_primary, ports.pg_replica, timeout=self.start_timeout
            )
            self._postgres.start()
            self._redis.wait_listening(ports.redis, timeout=self.start_timeout)
            self._kafka.wait_ready(self.start_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every started process and remove the temp directory. Safe to call repeatedly."""
        if self._base is None:
            return
        if self._kafka is not None:
            self._kafka.kill()  # its data is about to be deleted: a clean shutdown would only cost time
        if self._redis is not None:
            self._redis.stop()
        if self._postgres is not None:
            self._postgres.stop()
        self._kafka = self._redis = self._postgres = None
        shutil.rmtree(self._base, ignore_errors=True)
        self._base = None
        self._ports = None

    def __enter__(self) -> BackingServices:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- addresses --

    @property
    def base_dir(self) -> Path:
        """The temp directory holding data directories and logs; removed by ``stop()``."""
        if self._base is None:
            raise InfraError("not started")
        return self._base

    @property
    def ports(self) -> Ports:
        if self._ports is None:
            raise InfraError("not started")
        return self._ports

    @property
    def postgres(self) -> PostgresPair:
        if self._postgres is None:
            raise InfraError("not started")
        return self._postgres

    @property
    def kafka(self) -> KafkaBroker:
        if self._kafka is None:
            raise InfraError("not started")
        return self._kafka

    @property
    def pg_primary_dsn(self) -> str:
        """``postgresql://postgres@127.0.0.1:PORT/postgres``; add ``+asyncpg`` for SQLAlchemy."""
        return pg_dsn(self.ports.pg_primary)

    @property
    def pg_replica_dsn(self) -> str:
        """Same form as ``pg_primary_dsn``, for the hot-standby replica (read-only)."""
        return pg_dsn(self.ports.pg_replica)

    @property
    def redis_url(self) -> str:
        return f"redis://{LOOPBACK}:{self.ports.redis}/0"

    @property
    def kafka_bootstrap(self) -> str:
        return f"{LOOPBACK}:{self.ports.kafka}"

    def env(self) -> dict[str, str]:
        """The addresses as the environment variables the test suite reads."""
        return {
            "RELAYGATE_TEST_PG_PRIMARY": self.pg_primary_dsn,
            "RELAYGATE_TEST_PG_REPLICA": self.pg_replica_dsn,
            "RELAYGATE_TEST_REDIS_URL": self.redis_url,
            "RELAYGATE_TEST_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
        }

    # -- databases --

    def create_database(self, name: str, *, timeout: float = 10.0) -> tuple[str, str]:
        """See :meth:`PostgresPair.create_database`: ``(primary_dsn, replica_dsn)`` of a new database."""
        return self.postgres.create_database(name, timeout=timeout)

    def wait_for_replica(self, timeout: float = 5.0) -> None:
        self.postgres.wait_for_replica(timeout)

    # -- failure injection --

    def stop_redis(self) -> None:
        """Stop Redis; its data is gone for good. No-op when already stopped."""
        if self._redis is not None:
            self._redis.stop()
            self._redis = None

    def start_redis(self) -> None:
        """Start an empty Redis on the same port and wait until it accepts connections."""
        if self._redis is None or not self._redis.running:
            self._redis = self._spawn_redis()
            self._redis.wait_listening(self.ports.redis, timeout=self.start_timeout)

    def stop_kafka(self) -> None:
        """Shut the broker down cleanly; its log stays for :meth:`start_kafka`."""
        self.kafka.stop()

    def kill_kafka(self) -> None:
        """SIGKILL the broker, like a crash; what it had written to its files stays."""
        self.kafka.kill()

    def erase_kafka(self) -> None:
        """SIGKILL the broker and delete its log: ``start_kafka()`` then brings back an empty broker."""
        self.kafka.erase()

    def start_kafka(self) -> None:
        """Start the broker again on the same ports and log directory (no-op when running)."""
        self.kafka.start(self.start_timeout)

    def pause_replica_replay(self) -> None:
        self.postgres.pause_replica_replay()

    def resume_replica_replay(self) -> None:
        self.postgres.resume_replica_replay()

    def stop_replica(self) -> None:
        self.postgres.stop_replica()

    def start_replica(self) -> None:
        self.postgres.start_replica()

    def _spawn_redis(self) -> ManagedProcess:
        workdir = self.base_dir / "redis"
        workdir.mkdir(exist_ok=True)
        # --dir keeps any stray file inside the temp dir; --save '' and --appendonly no disable persistence.
        argv = [
            "redis-server",
            "--bind", LOOPBACK,
            "--port", str(self.ports.redis),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(workdir),
            "--daemonize", "no",
        ]  # fmt: skip
        return ManagedProcess("redis", argv, self.base_dir / "redis.log", cwd=workdir)


def main() -> None:
    """Start everything, print the environment lines, and keep running until Ctrl-C, SIGTERM or SIGHUP."""

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    # The servers run in sessions of their own, so a closed terminal would leave them running.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupt)
    services = BackingServices()
    started = time.monotonic()
    try:
        services.start()
        for key, value in services.env().items():
            print(f"{key}={value}", flush=True)
        print(
            f"# ready in {time.monotonic() - started:.2f}s, logs in {services.base_dir}; Ctrl-C stops",
            file=sys.stderr,
            flush=True,
        )
        while True:
            signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        services.stop()


if __name__ == "__main__":
    main()
