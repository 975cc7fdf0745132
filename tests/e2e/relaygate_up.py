"""``relaygate up`` as a user runs it: a child process in its data directory, with no RELAYGATE_ settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

__all__ = ["start_up"]


def start_up(data_dir: Path, port: int, *extra: str) -> subprocess.Popen[str]:
    """Start ``relaygate up --port PORT --data-dir DATA_DIR EXTRA...``; its output is on ``stdout``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAYGATE_")}
    argv = [sys.executable, "-m", "services.cli", "up", *extra]
    argv += ["--port", str(port), "--data-dir", str(data_dir)]
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=data_dir
    )
