"""The logger as a separate process (``python -m services.logger``), the way ``services.stack`` runs it, so
that tests can SIGKILL it, or run two of them in one consumer group."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from devinfra.processes import ManagedProcess, free_port
from services.logger.settings import LoggerSettings

_REPO = Path(__file__).resolve().parents[2]


def settings_env(settings: LoggerSettings) -> dict[str, str]:
    """The ``RELAYGATE_*`` environment that makes a process build exactly ``settings``."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump().items():
        if isinstance(value, list):
            value = ",".join(value)
        env[f"RELAYGATE_{name.upper()}"] = str(value)
    return env


class LoggerProcess:
    """One logger process with its own gRPC port and log file; ``start()`` returns once it serves gRPC."""

    def __init__(self, settings: LoggerSettings, log_path: Path) -> None:
        self.port = free_port()
        self.env = {
            **settings_env(settings),
            "RELAYGATE_LOGGER_LISTEN": f"127.0.0.1:{self.port}",
            "RELAYGATE_LOG_FORMAT": "json",
        }
        self.log_path = log_path
        self._process: ManagedProcess | None = None

    def start(self, timeout: float = 30.0) -> LoggerProcess:
        argv = [sys.executable, "-m", "services.logger"]
        env = {**os.environ, **self.env}
        self._process = ManagedProcess("logger", argv, self.log_path, env=env, cwd=_REPO)
        try:
            self._process.wait_listening(self.port, timeout=timeout)
        except BaseException:
            self._process.kill()
            raise
        return self

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.running

    def send(self, sig: signal.Signals, timeout: float = 20.0) -> int:
        """Send ``sig`` and wait for the exit (SIGKILL after ``timeout``); the exit code (negative: the
        signal that ended it, so a logger that ignored SIGTERM shows as -9)."""
        if self._process is None:
            raise AssertionError("not started")
        return self._process.send(sig, timeout)

    def kill(self) -> int:
        return self.send(signal.SIGKILL)

    def terminate(self) -> int:
        """SIGTERM, the way Kubernetes stops a pod: the last batch is written and committed first."""
        return self.send(signal.SIGTERM)

    def log_records(self) -> list[dict[str, Any]]:
        records = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                records.append(json.loads(line))
        return records

    def errors(self) -> list[dict[str, Any]]:
        return [r for r in self.log_records() if r.get("level") in ("error", "critical")]

    def assignments(self) -> list[list[str]]:
        """Every partition assignment this process logged, in order."""
        return [r["partitions"] for r in self.log_records() if r.get("msg") == "partitions assigned"]

    def log_tail(self, lines: int = 40) -> str:
        return self._process.log_tail(lines) if self._process is not None else ""
