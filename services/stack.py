"""Running the four services as separate local processes: for ``relaygate up``, tests and benchmarks.

Each service is started with ``python -m services.<name>`` and the same ``RELAYGATE_*`` environment
a deployment would give it; nothing is shared in memory.

When no Kafka bootstrap server is given, an Apache Kafka broker is started too (single-node KRaft, see
:mod:`devinfra.kafka`), keeping its log in ``kafka_dir`` across runs. Not the in-memory Tansu broker,
although it would save about 2 s per start (measured: 1.5 s vs 3.7 s to a ready stack): the relay's
producer is idempotent, which Tansu cannot serve to aiokafka, and a broker that loses its log on a
restart loses usage records, which settlement will ride.

The services talk over mutual TLS: each process gets its identity's certificate from ``certs`` (issued
under ``log_dir``'s parent when none is given, see :mod:`services.stack_certs`), unless the shared
environment sets ``RELAYGATE_GRPC_TLS=off``.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from devinfra.kafka import KafkaBroker, fetch
from devinfra.processes import STOP_GRACE_S, ManagedProcess, free_port, free_ports
from services.common.grpc import channel
from services.common.tls import RELAY
from services.stack_certs import Certificates, ensure_certificates
from services.stack_secrets import StackSecrets

SERVICES = ("auth", "quota", "logger", "relay")

# A relay's way out fits in the grace :meth:`LocalStack.stop` gives each process before SIGKILL, with
# room for the process to exit: past its own timeout a relay writes its threads' stacks to its log
# and exits, where a SIGKILL would leave nothing to say what it waited for. Its requests in flight get
# a short drain (a production relay gets 30 s). Settings in the stack's env or the caller's override
# these.
RELAY_SHUTDOWN_ENV = {
    "RELAYGATE_SHUTDOWN_TIMEOUT_S": f"{STOP_GRACE_S - 3:g}",
    "RELAYGATE_HTTP_DRAIN_S": "5",
}


@dataclass
class LocalStack:
    """Starts and stops the services; ``env`` is the shared configuration (database, Redis, Kafka).

    ``secrets`` reach the auth process only; by default they are fresh random ones for this stack.
    ``certs``: the certificates every process presents (see the module docstring).
    """

    env: dict[str, str]
    log_dir: Path
    relay_port: int = 0
    # The relay's gRPC front (InferenceService); chosen at start when 0.
    relay_grpc_port: int = 0
    extra_env: dict[str, dict[str, str]] = field(default_factory=dict)
    secrets: StackSecrets = field(default_factory=StackSecrets.generate)
    kafka_dir: Path | None = None
    certs: Certificates | None = None
    processes: list[ManagedProcess] = field(default_factory=list)
    broker: KafkaBroker | None = None

    @property
    def relay_url(self) -> str:
        return f"http://127.0.0.1:{self.relay_port}"

    @property
    def relay_grpc_address(self) -> str:
        return f"127.0.0.1:{self.relay_grpc_port}"

    def port_of(self, name: str) -> int:
        return next(p.port for p in self.processes if p.name == name)

    def start(self, *, timeout: float = 60.0) -> LocalStack:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.certs is None:
            self.certs = ensure_certificates(self.log_dir.parent / "tls")
        try:
            if not self.env.get("RELAYGATE_KAFKA_BOOTSTRAP"):
                self._start_broker(timeout)
            taken = {self.relay_port, self.relay_grpc_port, *(p.port for p in self.processes)}
            candidates = [p for p in free_ports(8) if p not in taken]
            ports = dict(zip(("auth", "quota", "logger"), candidates, strict=False))
            self.relay_port = self.relay_port or candidates[3]
            self.relay_grpc_port = self.relay_grpc_port or candidates[4]
            self.env.update(
                RELAYGATE_AUTH_LISTEN=f"127.0.0.1:{ports['auth']}",
                RELAYGATE_AUTH_ADDR=f"127.0.0.1:{ports['auth']}",
                RELAYGATE_QUOTA_LISTEN=f"127.0.0.1:{ports['quota']}",
                RELAYGATE_QUOTA_ADDR=f"127.0.0.1:{ports['quota']}",
                RELAYGATE_LOGGER_LISTEN=f"127.0.0.1:{ports['logger']}",
                RELAYGATE_LOGGER_ADDR=f"127.0.0.1:{ports['logger']}",
                RELAYGATE_RELAY_HOST="127.0.0.1",
                RELAYGATE_RELAY_PORT=str(self.relay_port),
            )
            # The gRPC front's port is this relay's own: relays started later get none of it.
            own = {"relay": {"RELAYGATE_RELAY_GRPC_LISTEN": self.relay_grpc_address}}
            for name in SERVICES:
                port = self.relay_port if name == "relay" else ports[name]
                extra = {**own.get(name, {}), **self.extra_env.get(name, {})}
                self._spawn(name, [sys.executable, "-m", f"services.{name}"], port, extra)
            for name in SERVICES:
                self._wait_port(name, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def client(self, service: str, *, identity: str = RELAY) -> grpc.aio.Channel:
        """A channel to the stack's ``service`` (auth, quota or logger), presenting ``identity``'s
        certificate (the relay's by default: it may call almost every RPC)."""
        plaintext = self.env.get("RELAYGATE_GRPC_TLS", "").lower() in ("off", "false", "0", "no")
        tls = None if plaintext or self.certs is None else self.certs.tls(identity)
        return channel(f"127.0.0.1:{self.port_of(service)}", tls=tls, peer=service)

    def add_relay(self, *, timeout: float = 60.0) -> str:
        """Start one more relay process on the same services (relays are stateless); returns its URL."""
        port = free_port()
        name = f"relay-{len(self.processes)}"
        argv = [sys.executable, "-m", "services.relay"]
        self._spawn(name, argv, port, {"RELAYGATE_RELAY_PORT": str(port)}, service="relay")
        self._wait_port(name, timeout)
        return f"http://127.0.0.1:{port}"

    def _start_broker(self, timeout: float) -> None:
        """Apache Kafka on free ports, its log in ``kafka_dir`` (default: beside ``log_dir``); its jars
        are fetched from Maven Central first when missing (once, about 7 s)."""
        fetch()
        port, controller_port = free_ports(2)
        kafka_dir = self.kafka_dir or self.log_dir.parent / "kafka"
        self.broker = KafkaBroker(kafka_dir, port, controller_port, log_path=self.log_dir / "kafka.log")
        self.broker.start(max(timeout, 90.0))
        self.env["RELAYGATE_KAFKA_BOOTSTRAP"] = self.broker.bootstrap

    def process_env(self, service: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of one more process of ``service`` (auth, quota, logger or relay): the shared
        settings, its certificate, auth's secrets for auth, then ``extra``."""
        own = self.certs.env(service) if self.certs is not None else {}
        if service == "auth":
            own.update(self.secrets.env())
        defaults = RELAY_SHUTDOWN_ENV if service == "relay" else {}
        return {**defaults, **os.environ, **self.env, **own, **(extra or {})}

    def _spawn(
        self, name: str, argv: list[str], port: int, extra: dict[str, str], *, service: str = ""
    ) -> None:
        env = self.process_env(service or name, extra)
        self.processes.append(ManagedProcess(name, argv, self.log_dir / f"{name}.log", env=env, port=port))

    def _wait_port(self, name: str, timeout: float) -> None:
        self._process(name).wait_listening(timeout=timeout)

    def _process(self, name: str) -> ManagedProcess:
        return next(p for p in self.processes if p.name == name)

    def log_tail(self, name: str, lines: int = 30) -> str:
        return self._process(name).log_tail(lines)

    def shutdown_log(self, name: str) -> str:
        """What process ``name`` logged on its latest way out: a relay's shutdown start, each step with
        its milliseconds and the thread stacks of an overrun, for the message of a stop that failed."""
        output = self._process(name).output()
        # The stacks a relay's watchdog writes when the way out overran, from its header to the end.
        output, stacks, dump = output.partition("\nTimeout (")
        lines = [line for line in output.splitlines() if '"shutdown' in line]
        return "\n".join(lines) + (stacks + dump if stacks else "")

    def crashed(self) -> list[str]:
        crashed = [p.name for p in self.processes if not p.running]
        return crashed + (["kafka"] if self.broker is not None and not self.broker.running else [])

    def stop_service(self, name: str, sig: signal.Signals = signal.SIGTERM, timeout: float = 20.0) -> int:
        return self._process(name).send(sig, timeout)

    def stop(self) -> None:
        """SIGTERM in reverse start order (the relay drains first), then the broker's clean shutdown."""
        for process in reversed(self.processes):
            process.send(signal.SIGTERM)
        self.processes.clear()
        if self.broker is not None:
            self.broker.stop()
            self.broker = None
