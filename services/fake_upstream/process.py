"""The fake upstream in a child process (``python -m services.fake_upstream``), for benchmarks and
demos where it must not share the caller's interpreter, and for testing the CLI itself.

Control goes over HTTP to the ``/_fake/`` endpoints, so the API mirrors :class:`.server.FakeUpstream`.
"""

from __future__ import annotations

import dataclasses
import os
import selectors
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any, Self, cast

import orjson

from .behaviour import Behaviour, to_text
from .server import START_TIMEOUT_S, STOP_TIMEOUT_S
from .stats import StatsSnapshot

_PROJECT_ROOT = Path(__file__).resolve().parents[2]
_ANNOUNCEMENT = "listening on "


class FakeUpstreamProcess:
    """Start ``python -m services.fake_upstream`` and talk to it.

    ``start()`` returns once the child printed its ``listening on URL`` line; ``stop()`` sends
    SIGTERM and returns the exit code (0 after a clean shutdown).
    """

    def __init__(
        self,
        behaviour: Behaviour | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        python: str = sys.executable,
        **behaviour_fields: Any,
    ) -> None:
        initial = (behaviour or Behaviour()).copy()
        initial.update(behaviour_fields)
        self._behaviour = initial
        self.host = host
        self.port = port
        self.python = python
        self.url = ""
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def command(self) -> list[str]:
        """The command line that starts the child."""
        flags = [
            f"--{spec.name.replace('_', '-')}={to_text(getattr(self._behaviour, spec.name))}"
            for spec in dataclasses.fields(Behaviour)
        ]
        return [
            self.python,
            "-m",
            "services.fake_upstream",
            f"--host={self.host}",
            f"--port={self.port}",
            *flags,
        ]

    def start(self, timeout: float = START_TIMEOUT_S) -> Self:
        if self._process is not None:
            raise RuntimeError("the fake upstream process is already running")
        env = dict(os.environ)
        # The child must import this very package, wherever the caller's working directory is.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PROJECT_ROOT), env.get("PYTHONPATH")]))
        process = subprocess.Popen(self.command(), stdout=subprocess.PIPE, env=env)
        self._process = process
        assert process.stdout is not None
        line = _read_line(process.stdout.fileno(), timeout)
        if not (line.startswith(_ANNOUNCEMENT) and line.endswith("\n")):
            self.stop()
            raise RuntimeError(f"the fake upstream process did not start (said {line!r})")
        self.url = line[len(_ANNOUNCEMENT) :].strip()
        return self

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM the child and wait; returns its exit code (``None`` if it was not started)."""
        process = self._process
        if process is None:
            return None
        self._process = None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdout is not None:
            process.stdout.close()
        return process.returncode

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def behaviour(self) -> Behaviour:
        return Behaviour(**self._control("GET", "/_fake/behaviour"))

    def configure(self, **fields: Any) -> Behaviour:
        return Behaviour(**self._control("POST", "/_fake/behaviour", fields))

    def reset(self) -> Behaviour:
        return Behaviour(**self._control("POST", "/_fake/reset", {}))

    def stats(self) -> StatsSnapshot:
        return cast(StatsSnapshot, self._control("GET", "/_fake/stats"))

    def _control(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        if not self.url:
            raise RuntimeError("the fake upstream process is not running")
        data = None if body is None else orjson.dumps(body)
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        request.add_header("content-type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=STOP_TIMEOUT_S) as response:
                return orjson.loads(response.read())
        except urllib.error.HTTPError as error:
            detail = orjson.loads(error.read())["error"]["message"]
            raise ValueError(f"{method} {path}: {detail}") from None


def _read_line(fd: int, timeout: float) -> str:
    """The first line written to pipe ``fd`` within ``timeout`` seconds ("" if none)."""
    # Raw reads: a buffered reader could swallow the line while select() keeps waiting on the fd.
    data = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while b"\n" not in data:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                break
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
    return data.split(b"\n", 1)[0].decode(errors="replace") + ("\n" if b"\n" in data else "")
