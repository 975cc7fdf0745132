"""The whole gateway as separate processes on the real backing services, for end-to-end tests."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from devinfra.backing import BackingServices
from devinfra.processes import ManagedProcess, free_ports
from services.auth.keys import generate
from services.fake_upstream.server import FakeUpstream
from services.stack import LocalStack
from tests.db_fixtures import DbUrls
from tests.tls import certificates

MODEL = "gpt-e2e"
PRICE = {"input_per_mtok": 2_000_000, "output_per_mtok": 8_000_000, "default_max_output_tokens": 512}


@dataclass
class Deployment:
    stack: LocalStack
    upstream: FakeUpstream
    admin_key: str
    db: DbUrls
    # Relay processes beyond the stack's own, by process name (see :func:`deploy_pairs`).
    more_relays: dict[str, str] = field(default_factory=dict)
    # The process of the relay the tests call, and its gRPC front: the stack's own relay, or one with
    # settings of its own started on a shared stack (see :class:`SharedStack`).
    relay_name: str = "relay"
    own_grpc_address: str = ""

    @property
    def relay_url(self) -> str:
        if self.relay_name == "relay":
            return self.stack.relay_url
        return f"http://127.0.0.1:{self.stack.port_of(self.relay_name)}"

    @property
    def relay_grpc_address(self) -> str:
        return self.own_grpc_address or self.stack.relay_grpc_address

    @property
    def relay_log(self) -> Path:
        return self.process(self.relay_name).log_path

    @property
    def relay_urls(self) -> list[str]:
        """Every relay of the deployment, the stack's own first."""
        return [self.relay_url, *self.more_relays.values()]

    def process(self, name: str) -> ManagedProcess:
        return next(p for p in self.stack.processes if p.name == name)

    def admin_token(self) -> str:
        """A fresh admin token, exchanged for the bootstrap admin key."""
        response = httpx.post(
            f"{self.relay_url}/admin/v1/tokens",
            headers={"authorization": f"Bearer {self.admin_key}"},
            timeout=10,
        )
        assert response.status_code == 201, response.text
        return str(response.json()["token"])

    def admin(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.relay_url, headers={"authorization": f"Bearer {self.admin_token()}"}, timeout=10
        )


def stack_env(backing: BackingServices, db: DbUrls) -> dict[str, str]:
    tag = uuid.uuid4().hex[:8]
    return {
        "RELAYGATE_DATABASE_URL": db.primary,
        "RELAYGATE_DATABASE_REPLICA_URLS": db.replica,
        "RELAYGATE_REDIS_URL": backing.redis_url,
        "RELAYGATE_KAFKA_BOOTSTRAP": backing.kafka_bootstrap,
        "RELAYGATE_KAFKA_TOPIC_PREFIX": f"e2e{tag}.",
        "RELAYGATE_LOGGER_GROUP_ID": f"e2e-logger-{tag}",
        "RELAYGATE_SETTLE_GROUP_ID": f"e2e-quota-{tag}",
        "RELAYGATE_BATCH_MAX_SECONDS": "0.2",
        "RELAYGATE_KAFKA_SESSION_TIMEOUT_MS": "3000",
        "RELAYGATE_KAFKA_HEARTBEAT_INTERVAL_MS": "300",
        "RELAYGATE_CHANNEL_REFRESH_S": "0.5",
        "RELAYGATE_LOG_FORMAT": "json",
    }


@contextlib.contextmanager
def deploy(
    backing: BackingServices,
    db: DbUrls,
    log_dir: Path,
    *,
    relay_env: dict[str, str] | None = None,
    upstream: FakeUpstream | None = None,
    service_env: Mapping[str, str] | None = None,
    own_env: Mapping[str, Mapping[str, str]] | None = None,
) -> Iterator[Deployment]:
    """The four services on ``db`` and the session's Redis and Kafka, one fake upstream channel serving
    :data:`MODEL` at :data:`PRICE`; ``relay_env`` adds ``RELAYGATE_*`` settings for the relay,
    ``service_env`` for every service (and every process started later from the stack's settings),
    ``own_env`` for one service's first process only (by service name).

    The relay's event spool lives under ``log_dir`` (never in the working directory)."""
    admin_key = generate()[0]
    upstream = upstream or FakeUpstream()
    if not upstream.running:
        upstream.start()
    env = stack_env(backing, db)
    env["RELAYGATE_EVENT_SPOOL_DIR"] = str(log_dir / "spool")
    env.update(service_env or {})
    stack = LocalStack(
        env=env,
        log_dir=log_dir,
        extra_env=_own_env(admin_key, relay_env, own_env),
        certs=certificates(),
    )
    try:
        stack.start()
        deployment = Deployment(stack, upstream, admin_key, db)
        with deployment.admin() as admin:
            ok(
                admin.post(
                    "/admin/v1/channels",
                    json={
                        "name": "fake",
                        "base_url": upstream.base_url,
                        "models": [MODEL],
                        "weight": 1,
                        "enabled": True,
                    },
                )
            )
            ok(admin.put(f"/admin/v1/prices/{MODEL}", json=PRICE))
        yield deployment
    finally:
        stack.stop()
        upstream.stop()


@contextlib.contextmanager
def deploy_pairs(
    backing: BackingServices,
    db: DbUrls,
    log_dir: Path,
    *,
    service_env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> Iterator[Deployment]:
    """Like :func:`deploy`, with two quota processes and two relay processes: auth, ``quota`` and
    ``quota-b``, the logger, ``relay`` and one more relay (:attr:`Deployment.more_relays`).

    Both relays reach both quota processes through one gRPC target listing the two addresses
    (``ipv4:///a,b``; the client balances round robin), so consecutive syncs and reserves of one relay
    are answered by different quota processes: nothing may depend on a quota process's memory.
    """
    with deploy(backing, db, log_dir, service_env=service_env) as deployment:
        stack = deployment.stack
        quota_port, relay_port = free_ports(2)
        stack.env["RELAYGATE_QUOTA_ADDR"] = (
            f"ipv4:///127.0.0.1:{stack.port_of('quota')},127.0.0.1:{quota_port}"
        )
        # The stack's relay was started with one quota address: it is started again with both. The
        # three new processes start side by side (a relay balances over whichever quota answers).
        first = deployment.process("relay")
        first.stop()
        started = [
            _start(stack, "quota-b", "quota", quota_port, RELAYGATE_QUOTA_LISTEN=f"127.0.0.1:{quota_port}"),
            _start(stack, "relay", "relay", first.port),
            _start(stack, "relay-b", "relay", relay_port, RELAYGATE_RELAY_PORT=str(relay_port)),
        ]
        stack.processes.insert(stack.processes.index(deployment.process("quota")) + 1, started[0])
        stack.processes[stack.processes.index(first)] = started[1]
        stack.processes.append(started[2])
        for process in started:
            process.wait_listening(timeout=timeout)
        deployment.more_relays["relay-b"] = f"http://127.0.0.1:{relay_port}"
        yield deployment


class SharedStack:
    """One deployment shared by the modules marked ``shared_stack``: the services, their database and
    the fake upstream start once per session. A module whose relay needs settings of its own gets a
    relay process with them on the same services for its tests.

    A module changes only what is its own (users, keys, channels and models it creates, budgets of its
    users), never :data:`MODEL`'s channel or price, and puts back any service it stops; the fake
    upstream's behaviour, the one global thing tests set, is reset at each module's start, and the
    processes a module started (its relay, relays it added) are stopped after it."""

    def __init__(self, deployment: Deployment) -> None:
        self._deployment = deployment
        self._started = 0

    @contextlib.contextmanager
    def module(self, relay_env: Mapping[str, str]) -> Iterator[Deployment]:
        """The deployment one module sees: its own relay list, on a relay with ``relay_env``."""
        shared = self._deployment
        stack = shared.stack
        shared.upstream.reset()
        before = {process.name for process in stack.processes}
        try:
            if relay_env:
                name, grpc_address = self._start_relay(relay_env)
                yield dataclasses.replace(
                    shared, more_relays={}, relay_name=name, own_grpc_address=grpc_address
                )
            else:
                yield dataclasses.replace(shared, more_relays={})
        finally:
            for process in [p for p in stack.processes if p.name not in before]:
                process.stop()
                stack.processes.remove(process)

    def _start_relay(self, relay_env: Mapping[str, str]) -> tuple[str, str]:
        """A relay process with ``relay_env`` (and a gRPC front); its name and gRPC address."""
        stack = self._deployment.stack
        self._started += 1
        port, grpc_port = free_ports(2)
        name = f"relay-own-{self._started}"
        grpc_address = f"127.0.0.1:{grpc_port}"
        env = {"RELAYGATE_RELAY_PORT": str(port), "RELAYGATE_RELAY_GRPC_LISTEN": grpc_address}
        process = _start(stack, name, "relay", port, **env, **relay_env)
        stack.processes.append(process)
        process.wait_listening(timeout=60)
        return name, grpc_address


def _own_env(
    admin_key: str, relay_env: Mapping[str, str] | None, own_env: Mapping[str, Mapping[str, str]] | None
) -> dict[str, dict[str, str]]:
    extra: dict[str, dict[str, str]] = {name: dict(env) for name, env in (own_env or {}).items()}
    extra.setdefault("auth", {})["RELAYGATE_BOOTSTRAP_ADMIN_KEY"] = admin_key
    extra.setdefault("relay", {}).update(relay_env or {})
    return extra


def _start(stack: LocalStack, name: str, service: str, port: int, **env: str) -> ManagedProcess:
    """One more process of ``service`` with the stack's settings (and ``env``), logging to its log dir."""
    return ManagedProcess(
        name,
        [sys.executable, "-m", f"services.{service}"],
        stack.log_dir / f"{name}.log",
        env=stack.process_env(service, env),
        port=port,
    )


def ok(response: httpx.Response) -> dict[str, Any]:
    assert response.is_success, f"{response.request.method} {response.request.url}: {response.text}"
    body: dict[str, Any] = response.json()
    return body


def fund_user(deployment: Deployment, amount_micros: int, **key_fields: object) -> tuple[str, str]:
    """A new user with ``amount_micros`` of credit and one key; returns (user_id, plaintext key)."""
    with deployment.admin() as admin:
        user_id = str(
            ok(admin.post("/admin/v1/users", json={"name": f"user-{uuid.uuid4().hex[:6]}"}))["user_id"]
        )
        ok(
            admin.post(
                f"/admin/v1/users/{user_id}/topups", json={"amount_micros": amount_micros, "reason": "test"}
            )
        )
        key = ok(admin.post("/admin/v1/keys", json={"user_id": user_id, "name": "e2e", **key_fields}))
        return user_id, str(key["api_key"])


def balance(deployment: Deployment, user_id: str) -> dict[str, int]:
    with deployment.admin() as admin:
        body = ok(admin.get(f"/admin/v1/users/{user_id}/balance", params={"consistent": "true"}))
        return {k: int(v) for k, v in body.items() if k != "user_id"}


def only_log_row(deployment: Deployment, user_id: str, timeout: float = 15.0) -> dict[str, Any]:
    """The user's one request-log row, once it is written (a second row fails)."""
    deadline = time.monotonic() + timeout
    with deployment.admin() as admin:
        while True:
            rows = admin.get("/admin/v1/logs", params={"user_id": user_id}).json().get("logs", [])
            if rows:
                assert len(rows) == 1, rows
                row: dict[str, Any] = rows[0]
                return row
            assert time.monotonic() < deadline, "no request log row"
            time.sleep(0.1)


def settled(deployment: Deployment, user_id: str, timeout: float = 15.0) -> dict[str, int]:
    """The user's balance once nothing is held; fails when something still is after ``timeout``."""
    current = settled_balance(deployment, user_id, timeout)
    assert current["reserved_micros"] == 0, f"still held: {current}"
    return current


def settled_balance(deployment: Deployment, user_id: str, timeout: float = 20.0) -> dict[str, int]:
    """The user's balance once nothing is held: requests are settled by their usage events, which
    quota's consumer applies shortly after the response."""
    deadline = time.monotonic() + timeout
    while (found := balance(deployment, user_id))["reserved_micros"] and time.monotonic() < deadline:
        time.sleep(0.1)
    return found
