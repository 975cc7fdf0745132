"""Real ``python -m services.quota`` processes on the test database and Redis, and gRPC clients to them."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from devinfra.backing import BackingServices
from devinfra.processes import ManagedProcess, free_port
from services.common.pb.relaygate.quota.v1 import quota_pb2_grpc
from services.common.tls import QUOTA
from tests.db_fixtures import DbUrls
from tests.tls import client, tls_env

REPO = Path(__file__).resolve().parents[2]


@dataclass
class QuotaProcess:
    name: str
    process: ManagedProcess
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.process.log_path.read_text(errors="replace")

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        self.process.send(sig)


@dataclass
class QuotaProcesses:
    """Starts quota processes sharing one database and Redis; stops every one of them on exit."""

    env: dict[str, str]
    log_dir: Path
    started: list[QuotaProcess] = field(default_factory=list)

    def start(self, name: str, *, timeout: float = 30.0, **extra: str) -> QuotaProcess:
        port = free_port()
        env = {**os.environ, **self.env, **extra, "RELAYGATE_QUOTA_LISTEN": f"127.0.0.1:{port}"}
        argv = [sys.executable, "-m", "services.quota"]
        process = ManagedProcess(name, argv, self.log_dir / f"{name}.log", env=env, cwd=REPO)
        self.started.append(QuotaProcess(name, process, port))
        process.wait_listening(port, timeout=timeout)
        return self.started[-1]

    def stop(self) -> None:
        for started in reversed(self.started):
            started.kill(signal.SIGTERM)
        self.started.clear()


def quota_env(backing: BackingServices, db: DbUrls, **overrides: str) -> dict[str, str]:
    return {
        "RELAYGATE_DATABASE_URL": db.primary,
        "RELAYGATE_DATABASE_REPLICA_URLS": db.replica,
        "RELAYGATE_REDIS_URL": backing.redis_url,
        "RELAYGATE_LOG_FORMAT": "json",
        "RELAYGATE_LOG_LEVEL": "INFO",
        "RELAYGATE_GRPC_DRAIN_SECONDS": "1",
        **tls_env(QUOTA),
        **overrides,
    }


@contextlib.contextmanager
def quota_processes(
    backing: BackingServices, db: DbUrls, log_dir: Path, **overrides: str
) -> Iterator[QuotaProcesses]:
    processes = QuotaProcesses(quota_env(backing, db, **overrides), log_dir)
    try:
        yield processes
    finally:
        processes.stop()


@contextlib.asynccontextmanager
async def stubs(*processes: QuotaProcess) -> AsyncIterator[list[quota_pb2_grpc.QuotaServiceAsyncStub]]:
    """One client stub per process, over its own channel."""
    async with contextlib.AsyncExitStack() as stack:
        found: list[quota_pb2_grpc.QuotaServiceAsyncStub] = []
        for process in processes:
            chan = await stack.enter_async_context(client(process.address, QUOTA))
            found.append(quota_pb2_grpc.QuotaServiceStub(chan))
        yield found
