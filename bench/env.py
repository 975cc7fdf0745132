"""The measured deployment: backing services, the four relaygate processes, the fake upstream, and seeding.

Everything listens on 127.0.0.1 only. :meth:`BenchEnv.start` either starts its own backing services
(PostgreSQL primary + streaming replica, Redis, Apache Kafka) or borrows running ones (the test
suite's session fixture), creates a fresh database for the run, migrates it, starts the fake upstream and
the stack, and seeds one channel, one price and funded users with keys through the admin API.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.procstat import Tracked, pid_listening_on
from devinfra.backing import BackingServices
from services.auth.keys import generate
from services.common.grpc import call
from services.common.pb.relaygate.auth.v1 import auth_pb2
from services.common.pb.relaygate.auth.v1.auth_pb2_grpc import AuthServiceStub
from services.fake_upstream.process import FakeUpstreamProcess
from services.migrations import upgrade
from services.stack import LocalStack

__all__ = ["MODEL", "BenchEnv", "ToolMissing", "ensure_tool", "raise_open_files_limit"]

MODEL = "bench-model"
# Tiny prices and huge balances: no run can exhaust a balance, yet every request is really metered.
PRICE = {"input_per_mtok": 1_000_000, "output_per_mtok": 2_000_000, "default_max_output_tokens": 256}
BALANCE_MICROS = 10**14
BASE_USERS = 10
UPSTREAM_CHUNKS = 20

# Per-stack settings: a relay must hold 2,000 streams (scenario 4) without queueing on its upstream pool,
# and with them spread over only BASE_USERS keys, without meeting the per-key stream cap (64 by default:
# a guard against one key hogging a relay, not a capacity limit).
STACK_SETTINGS = {
    "RELAYGATE_UPSTREAM_MAX_CONNECTIONS": "4096",
    "RELAYGATE_UPSTREAM_MAX_KEEPALIVE": "1024",
    "RELAYGATE_MAX_STREAMS_PER_KEY": "4096",
    "RELAYGATE_LOG_FORMAT": "json",
}

# Debian package of each external tool.
APT_PACKAGES = {"wrk": "wrk"}


class ToolMissing(RuntimeError):
    """A load-generating tool is not installed and could not be installed."""


def ensure_tool(name: str, *, install: bool) -> str:
    """The path of ``name``; installs its Debian package first when missing and ``install`` is set."""
    found = shutil.which(name)
    if found:
        return found
    package = APT_PACKAGES.get(name, name)
    if not install:
        raise ToolMissing(f"{name} is not installed: apt-get install -y {package}")
    if os.geteuid() != 0:
        raise ToolMissing(f"{name} is not installed and this is not root: sudo apt-get install -y {package}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", package]):
        subprocess.run(argv, env=env, check=True, timeout=600, stdout=subprocess.DEVNULL)
    found = shutil.which(name)
    if not found:
        raise ToolMissing(f"installing {package} did not provide {name}")
    return found


def raise_open_files_limit(wanted: int = 65536) -> int:
    """Raise this process's (and so its children's) open-file limit as far as allowed; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


@dataclass
class BenchEnv:
    """A running deployment to measure; build it with :meth:`start`, always :meth:`stop` it."""

    work_dir: Path
    backing: BackingServices
    owns_backing: bool
    db_primary: str
    db_replica: str
    topic_prefix: str
    upstream: FakeUpstreamProcess
    stack: LocalStack
    admin_key: str
    users: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    channel_ids: list[str] = field(default_factory=list)
    tracked: list[Tracked] = field(default_factory=list)

    # -- lifecycle ----------------------------------------------------------------------------------

    @classmethod
    def start(cls, work_dir: Path, *, backing: BackingServices | None = None) -> BenchEnv:
        work_dir.mkdir(parents=True, exist_ok=True)
        raise_open_files_limit()
        owns = backing is None
        services = backing if backing is not None else BackingServices().start()
        upstream: FakeUpstreamProcess | None = None
        stack: LocalStack | None = None
        try:
            tag = uuid.uuid4().hex[:8]
            primary, replica = services.create_database(f"bench_{tag}")
            asyncio.run(upgrade(primary))
            upstream = FakeUpstreamProcess(chunks=UPSTREAM_CHUNKS, latency_ms=0, chunk_interval_ms=0).start()
            admin_key = generate()[0]
            prefix = f"bench{tag}."
            stack = LocalStack(
                env={
                    "RELAYGATE_DATABASE_URL": primary,
                    "RELAYGATE_DATABASE_REPLICA_URLS": replica,
                    "RELAYGATE_REDIS_URL": services.redis_url,
                    "RELAYGATE_KAFKA_BOOTSTRAP": services.kafka_bootstrap,
                    "RELAYGATE_KAFKA_TOPIC_PREFIX": prefix,
                    "RELAYGATE_LOGGER_GROUP_ID": f"bench-logger-{tag}",
                    "RELAYGATE_SETTLE_GROUP_ID": f"bench-quota-{tag}",
                    **STACK_SETTINGS,
                },
                log_dir=work_dir / "logs",
                extra_env={"auth": {"RELAYGATE_BOOTSTRAP_ADMIN_KEY": admin_key}},
            ).start()
            env = cls(
                work_dir=work_dir,
                backing=services,
                owns_backing=owns,
                db_primary=primary,
                db_replica=replica,
                topic_prefix=prefix,
                upstream=upstream,
                stack=stack,
                admin_key=admin_key,
            )
            asyncio.run(env._seed())
            env.tracked = env._find_processes()
            return env
        except BaseException:
            if stack is not None:
                stack.stop()
            if upstream is not None:
                upstream.stop()
            if owns:
                services.stop()
            raise

    def stop(self) -> None:
        self.stack.stop()
        self.upstream.stop()
        if self.owns_backing:
            self.backing.stop()

    # -- addresses ----------------------------------------------------------------------------------

    @property
    def relay_url(self) -> str:
        return self.stack.relay_url

    @property
    def direct_url(self) -> str:
        """The fake upstream's origin (its API is under ``/v1``, like the relay's)."""
        return self.upstream.url

    @property
    def auth_addr(self) -> str:
        return f"127.0.0.1:{self.stack.port_of('auth')}"

    @property
    def quota_addr(self) -> str:
        return f"127.0.0.1:{self.stack.port_of('quota')}"

    @property
    def usage_topic(self) -> str:
        return f"{self.topic_prefix}usage"

    def keys_file(self, keys: list[str], name: str) -> Path:
        path = self.work_dir / name
        path.write_text("".join(f"{key}\n" for key in keys))
        return path

    def _find_processes(self) -> list[Tracked]:
        tracked = [Tracked(p.name, p.pid) for p in self.stack.processes]
        ports = self.backing.ports
        for name, port, tree in (
            ("kafka", ports.kafka, False),
            ("postgres", ports.pg_primary, True),
            ("pg-replica", ports.pg_replica, True),
            ("redis", ports.redis, False),
        ):
            pid = pid_listening_on(port)
            if pid is not None:
                tracked.append(Tracked(name, pid, tree))
        if self.upstream.pid is not None:
            tracked.append(Tracked("upstream", self.upstream.pid))
        return tracked

    # -- seeding ------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def admin(self) -> AsyncIterator[httpx.AsyncClient]:
        """An admin API client holding a fresh admin token (exchanged for the bootstrap admin key)."""
        async with httpx.AsyncClient(base_url=self.relay_url, timeout=30, trust_env=False) as client:
            key = {"authorization": f"Bearer {self.admin_key}"}
            token = _ok(await client.post("/admin/v1/tokens", headers=key))["token"]
            client.headers["authorization"] = f"Bearer {token}"
            yield client

    async def _seed(self) -> None:
        async with self.admin() as admin:
            self.channel_ids.append(await self.add_channel(admin, "bench-upstream"))
            _ok(await admin.put(f"/admin/v1/prices/{MODEL}", json=PRICE))
            for index in range(BASE_USERS):
                user = _ok(await admin.post("/admin/v1/users", json={"name": f"bench-{index}"}))
                user_id = str(user["user_id"])
                _ok(
                    await admin.post(
                        f"/admin/v1/users/{user_id}/topups",
                        json={"amount_micros": BALANCE_MICROS, "reason": "bench", "idempotency_key": user_id},
                    )
                )
                key = _ok(await admin.post("/admin/v1/keys", json={"user_id": user_id, "name": "bench"}))
                self.users.append(user_id)
                self.keys.append(str(key["api_key"]))
        await self._wait_ready()

    async def add_channel(self, admin: httpx.AsyncClient, name: str, weight: int = 1) -> str:
        body = {
            "name": name,
            "base_url": f"{self.upstream.url}/v1",
            "models": [MODEL],
            "weight": weight,
            "enabled": True,
            # Scenario 4 holds 2,000 streams through one channel: lift the per-channel pool cap above that.
            "max_connections": 4096,
        }
        return str(_ok(await admin.post("/admin/v1/channels", json=body))["channel_id"])

    async def add_channels(self, count: int) -> list[str]:
        """``count`` more channels serving the benchmarked model (same upstream, equal weights)."""
        async with self.admin() as admin:
            return [await self.add_channel(admin, f"bench-extra-{i}") for i in range(count)]

    async def delete_channels(self, channel_ids: list[str]) -> None:
        async with self.admin() as admin:
            for channel_id in channel_ids:
                _ok(await admin.delete(f"/admin/v1/channels/{channel_id}"))

    async def create_keys(self, count: int, *, concurrency: int = 32, timeout_s: float = 600) -> list[str]:
        """``count`` new keys spread over the funded users, created through auth's gRPC API."""
        grpc_channel = self.stack.client("auth")
        stub = AuthServiceStub(grpc_channel)
        created: list[str] = []
        queue = iter(range(count))
        deadline = time.monotonic() + timeout_s

        async def worker() -> None:
            for index in queue:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"created only {len(created)} of {count} keys in {timeout_s:.0f}s")
                request = auth_pb2.CreateKeyRequest(
                    user_id=self.users[index % len(self.users)], name=f"bench-growth-{index}"
                )
                response = await call(stub.CreateKey, request, timeout=30)
                created.append(response.api_key)

        try:
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        finally:
            await grpc_channel.close(None)
        return created

    async def _wait_ready(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(base_url=self.relay_url, timeout=5, trust_env=False) as client:
            while True:
                response = await client.get("/readyz")
                if response.status_code == 200:
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"relay not ready after {timeout_s:.0f}s: {response.text}")
                await asyncio.sleep(0.1)


def _ok(response: httpx.Response) -> dict[str, Any]:
    if not response.is_success:
        raise RuntimeError(f"{response.request.method} {response.request.url}: {response.text}")
    body: dict[str, Any] = response.json()
    return body
