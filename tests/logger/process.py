"""The logger as a separate process (``python -m services.logger``), the way ``services.stack`` runs it, so
that tests can SIGKILL it, or run two of them in one consumer group."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from services.logger.settings import LoggerSettings
from services.stack import free_port, port_open

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
        self._popen: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> LoggerProcess:
        with self.log_path.open("ab") as log:
            self._popen = subprocess.Popen(
                [sys.executable, "-m", "services.logger"],
                env={**os.environ, **self.env},
                cwd=_REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not port_open(self.port):
            if self._popen.poll() is not None:
                raise AssertionError(f"logger exited with {self._popen.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"logger did not listen within {timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)
        return self

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def send(self, sig: signal.Signals, timeout: float = 20.0) -> int:
        """Send ``sig`` and wait for the exit; returns the exit code (negative: killed by a signal)."""
        if self._popen is None:
            raise AssertionError("not started")
        if self._popen.poll() is None:
            self._popen.send_signal(sig)
            try:
                self._popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self._popen.kill()
                self._popen.wait()
                raise AssertionError(
                    f"logger ignored {sig.name} for {timeout}s:\n{self.log_tail()}"
                ) from None
        return self._popen.returncode

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
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
