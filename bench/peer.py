"""Peer gateways measured beside relaygate (``--peer litellm,portkey``): what a peer offers the scenarios,
the registry of known peers, and the readiness wait they share.

A peer is a third-party gateway run as a local process, routed to the same fake upstream as relaygate.
Each is installed outside the repository, under ``~/.cache/relaygate-bench/``, on first use.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Protocol

from bench.procstat import Tracked
from devinfra.processes import ManagedProcess

__all__ = ["CACHE_DIR", "PEER_NAMES", "Peer", "ProcessPeer", "parse_peers", "start_peer", "wait_http_ready"]

CACHE_DIR = Path.home() / ".cache" / "relaygate-bench"
PEER_NAMES = ("litellm", "portkey")


class Peer(Protocol):
    """A running peer gateway with the OpenAI API under ``origin + "/v1"``."""

    name: str
    version: str

    @property
    def origin(self) -> str: ...

    @property
    def keys(self) -> tuple[str, ...]:
        """What goes in ``Authorization: Bearer``."""
        ...

    @property
    def headers(self) -> tuple[tuple[str, str], ...]:
        """Extra request headers every call needs (routing, for gateways configured per request)."""
        ...

    def tracked(self) -> Tracked: ...

    def stop(self) -> None: ...


class ProcessPeer:
    """What every peer shares: one local process on a free port, its log, its readiness and its stop."""

    name = ""

    def __init__(self, work_dir: Path, *, upstream_base_url: str) -> None:
        self.work_dir = work_dir
        self.upstream_base_url = upstream_base_url
        self.port = 0
        self.version = ""
        self._process: ManagedProcess | None = None

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> tuple[tuple[str, str], ...]:
        return ()

    @property
    def log_path(self) -> Path:
        return self.work_dir / f"{self.name}.log"

    def _launch(
        self,
        argv: list[str],
        env: dict[str, str],
        *,
        ready_path: str,
        timeout_s: float,
        cwd: Path | None = None,
    ) -> None:
        """Start the process (``self.port`` already chosen) and wait until ``ready_path`` answers 200."""
        self._process = ManagedProcess(self.name, argv, self.log_path, env=env, cwd=cwd)
        try:
            wait_http_ready(self._process, f"{self.origin}{ready_path}", timeout_s=timeout_s)
        except RuntimeError:
            self.stop()
            raise

    def tracked(self) -> Tracked:
        assert self._process is not None
        return Tracked(self.name, self._process.pid, tree=True)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            process.stop(grace=15)


def parse_peers(text: str | None) -> list[str]:
    """``"litellm,portkey"`` -> the names, in order, without repeats; ``SystemExit`` on an unknown one."""
    names: list[str] = []
    for part in (text or "").split(","):
        name = part.strip().lower()
        if name and name not in names:
            names.append(name)
    unknown = [n for n in names if n not in PEER_NAMES]
    if unknown:
        raise SystemExit(f"unknown peers {unknown}; choose from {list(PEER_NAMES)}")
    return names


def start_peer(name: str, work_dir: Path, *, upstream_base_url: str) -> Peer:
    """Install (first use) and start the peer ``name``, routed to ``upstream_base_url`` (ends in ``/v1``)."""
    if name == "litellm":
        from bench.litellm_peer import LiteLLMPeer

        return LiteLLMPeer(work_dir / "litellm", upstream_base_url=upstream_base_url).start()
    if name == "portkey":
        from bench.portkey_peer import PortkeyPeer

        return PortkeyPeer(work_dir / "portkey", upstream_base_url=upstream_base_url).start()
    raise ValueError(f"unknown peer {name!r}")


def wait_http_ready(process: ManagedProcess, url: str, *, timeout_s: float) -> None:
    """Poll ``url`` until it answers 200; ``RuntimeError`` with the log's end if the process exits first
    or ``timeout_s`` passes (the caller stops the process)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if not process.running:
            raise RuntimeError(f"{process.name} exited with {process.returncode}\n{process.log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{process.name} not ready in {timeout_s:.0f}s\n{process.log_tail()}")
        time.sleep(0.25)
