"""The LiteLLM peer (``--peer litellm``): LiteLLM's proxy in a virtualenv of its own.

The virtualenv lives outside the repository (``~/.cache/relaygate-bench/litellm-venv``) and is created and
filled with ``pip install 'litellm[proxy]'`` on first use. The proxy runs with one worker, one model
routed to the same fake upstream, a master key (checked in memory; no database, so no per-key spend
tracking: LiteLLM does less work per request here than relaygate, which meters and logs every request).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bench.env import MODEL
from bench.peer import CACHE_DIR, ProcessPeer
from devinfra.processes import free_port

__all__ = ["MASTER_KEY", "LiteLLMPeer"]

DEFAULT_VENV = CACHE_DIR / "litellm-venv"
MASTER_KEY = "sk-relaygate-bench-master-key"
START_TIMEOUT_S = 180.0


class LiteLLMPeer(ProcessPeer):
    name = "litellm"

    def __init__(self, work_dir: Path, *, upstream_base_url: str, venv: Path = DEFAULT_VENV) -> None:
        super().__init__(work_dir, upstream_base_url=upstream_base_url)
        self.venv = venv

    @property
    def keys(self) -> tuple[str, ...]:
        return (MASTER_KEY,)

    def install(self) -> None:
        """Create the virtualenv and install the proxy unless already there."""
        binary = self.venv / "bin" / "litellm"
        if not binary.exists():
            print(f"installing LiteLLM proxy into {self.venv} (first use only) ...", flush=True)
            self.venv.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run([sys.executable, "-m", "venv", str(self.venv)], check=True, timeout=300)
            subprocess.run(
                [str(self.venv / "bin" / "pip"), "install", "-q", "litellm[proxy]"], check=True, timeout=1200
            )
        self.version = subprocess.run(
            [
                str(self.venv / "bin" / "python"),
                "-c",
                "import importlib.metadata as m; print(m.version('litellm'))",
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.strip()

    def start(self) -> LiteLLMPeer:
        self.install()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        config = self.work_dir / "litellm.yaml"
        config.write_text(
            "model_list:\n"
            f"  - model_name: {MODEL}\n"
            "    litellm_params:\n"
            f"      model: openai/{MODEL}\n"
            f"      api_base: {self.upstream_base_url}\n"
            "      api_key: sk-fake-upstream\n"
            "general_settings:\n"
            f"  master_key: {MASTER_KEY}\n"
            "litellm_settings:\n"
            "  telemetry: false\n"
        )
        self.port = free_port()
        argv = [
            str(self.venv / "bin" / "litellm"),
            "--config", str(config),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--num_workers", "1",
        ]  # fmt: skip
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("OPENAI_", "LITELLM_", "DATABASE_URL", "RELAYGATE_"))
        }
        env.update(LITELLM_TELEMETRY="False", LITELLM_LOG="ERROR", NO_PROXY="127.0.0.1,localhost")
        self._launch(argv, env, ready_path="/health/liveliness", timeout_s=START_TIMEOUT_S)
        return self
