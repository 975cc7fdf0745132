"""The Portkey peer (``--peer portkey``): the Portkey AI gateway (npm ``@portkey-ai/gateway``) on Node.

It is installed with npm into ``~/.cache/relaygate-bench/portkey/`` on first use, from a package.json
written there that pins the gateway and overrides ``@hono/node-server`` to 1.13.8 (newer releases
break its streaming). It runs headless, one Node process, and is routed per request: every call
carries ``x-portkey-provider: openai`` and ``x-portkey-custom-host: <fake upstream>/v1``, and its
``Authorization`` header is passed through to the upstream as the provider key. Portkey keeps no
per-key balances and writes no request log here, so it does less per request than relaygate.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from bench.peer import CACHE_DIR, ProcessPeer
from devinfra.processes import free_port

__all__ = ["GATEWAY_VERSION", "NODE_SERVER_VERSION", "PortkeyPeer", "installed"]

GATEWAY_VERSION = "1.15.2"
NODE_SERVER_VERSION = "1.13.8"
DEFAULT_DIR = CACHE_DIR / "portkey"
UPSTREAM_KEY = "sk-fake-upstream"
START_TIMEOUT_S = 60.0
INSTALL_TIMEOUT_S = 900.0
_LOOPBACK_PRELOAD = Path(__file__).with_name("portkey_loopback.cjs")
_GATEWAY = Path("node_modules", "@portkey-ai", "gateway")
_NODE_SERVER = Path("node_modules", "@hono", "node-server")


def _package_json() -> dict[str, object]:
    return {
        "name": "relaygate-bench-portkey",
        "private": True,
        "dependencies": {"@portkey-ai/gateway": GATEWAY_VERSION},
        "overrides": {"@hono/node-server": NODE_SERVER_VERSION},
    }


def _version(package_dir: Path) -> str:
    try:
        return str(json.loads((package_dir / "package.json").read_text())["version"])
    except (OSError, ValueError, KeyError):
        return ""


def installed(directory: Path = DEFAULT_DIR) -> bool:
    """Whether the pinned gateway and node-server are already in ``directory`` (no network needed)."""
    return (
        _version(directory / _GATEWAY) == GATEWAY_VERSION
        and _version(directory / _NODE_SERVER) == NODE_SERVER_VERSION
        and (directory / _GATEWAY / "build" / "start-server.js").is_file()
    )


class PortkeyPeer(ProcessPeer):
    name = "portkey"

    def __init__(self, work_dir: Path, *, upstream_base_url: str, directory: Path = DEFAULT_DIR) -> None:
        super().__init__(work_dir, upstream_base_url=upstream_base_url)
        self.directory = directory

    @property
    def keys(self) -> tuple[str, ...]:
        return (UPSTREAM_KEY,)

    @property
    def headers(self) -> tuple[tuple[str, str], ...]:
        return (("x-portkey-provider", "openai"), ("x-portkey-custom-host", self.upstream_base_url))

    def install(self) -> None:
        """``npm install`` the pinned gateway into the cache folder unless it is already there."""
        if not installed(self.directory):
            npm = shutil.which("npm")
            if npm is None or shutil.which("node") is None:
                raise RuntimeError("the Portkey peer needs Node.js 18+ and npm on PATH")
            print(f"installing the Portkey gateway into {self.directory} (first use only) ...", flush=True)
            self.directory.mkdir(parents=True, exist_ok=True)
            (self.directory / "package.json").write_text(json.dumps(_package_json(), indent=2) + "\n")
            subprocess.run(
                [npm, "install", "--no-audit", "--no-fund", "--loglevel=error"],
                cwd=self.directory,
                check=True,
                timeout=INSTALL_TIMEOUT_S,
                stdin=subprocess.DEVNULL,
            )
            if not installed(self.directory):
                raise RuntimeError(f"npm install in {self.directory} did not provide the pinned versions")
        self.version = _version(self.directory / _GATEWAY)

    def start(self) -> PortkeyPeer:
        self.install()
        node = shutil.which("node")
        if node is None:
            raise RuntimeError("the Portkey peer needs Node.js on PATH")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        argv = [
            node,
            "--require", str(_LOOPBACK_PRELOAD),
            str(self.directory / _GATEWAY / "build" / "start-server.js"),
            "--headless",
            f"--port={self.port}",
        ]  # fmt: skip
        env = {
            key: value for key, value in os.environ.items() if not key.startswith(("OPENAI_", "RELAYGATE_"))
        }
        env.update(NODE_ENV="production", NO_PROXY="127.0.0.1,localhost")
        self._launch(argv, env, ready_path="/", timeout_s=START_TIMEOUT_S, cwd=self.directory)
        return self
