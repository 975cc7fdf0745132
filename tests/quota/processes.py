"""Real ``python -m services.quota`` processes on the test database and Redis, and gRPC clients to them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from services.common.grpc import channel
from services.common.pb.relaygate.quota.v1 import quota_pb2_grpc
from services.stack import free_port, port_open
from tests.db_fixtures import DbUrls
from tests.infra.backing import BackingServices

REPO = Path(__file__).resolve().parents[2]


@dataclass
class QuotaProcess:
    name: str
    popen: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


@dataclass
class QuotaProcesses:
    """Starts quota processes sharing one database and Redis; stops every one of them on exit."""

    env: dict[str, str]
    log_dir: Path
    started: list[QuotaProcess] = field(default_factory=list)

    def start(self, name: str, *, timeout: float = 30.0, **extra: str) -> QuotaProcess:
        port = free_port()
        log_path = self.log_dir / f"{name}.log"
        env = {**os.environ, **self.env, **extra, "RELAYGATE_QUOTA_LISTEN": f"127.0.0.1:{port}"}
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                [sys.executable, "-m", "services.quota"],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        process = QuotaProcess(name, popen, port, log_path)
        self.started.append(process)
        deadline = time.monotonic() + timeout
        while not port_open(port):
            if popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"quota process {name} did not start:\n{process.log()[-3000:]}")
            time.sleep(0.05)
        return process

    def stop(self) -> None:
        for process in reversed(self.started):
            process.kill(signal.SIGTERM)
        self.started.clear()


def quota_env(backing: BackingServices, db: DbUrls, **overrides: str) -> dict[str, str]:
    return {
        "RELAYGATE_DATABASE_URL": db.primary,
        "RELAYGATE_DATABASE_REPLICA_URLS": db.replica,
        "RELAYGATE_REDIS_URL": backing.redis_url,
        "RELAYGATE_LOG_FORMAT": "json",
        "RELAYGATE_LOG_LEVEL": "INFO",
        "RELAYGATE_GRPC_DRAIN_SECONDS": "1",
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
            chan = await stack.enter_async_context(channel(process.address))
            found.append(quota_pb2_grpc.QuotaServiceStub(chan))
        yield found
