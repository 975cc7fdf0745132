"""``python -m services.auth``: the auth gRPC service, configured from ``RELAYGATE_*``."""

from __future__ import annotations

import asyncio

from services.auth.app import run
from services.auth.settings import AuthSettings
from services.common.heap import freeze_startup_heap
from services.common.telemetry import setup_logging, start_metrics_server


def main() -> None:
    settings = AuthSettings()
    setup_logging("auth", level=settings.log_level, fmt=settings.log_format)
    start_metrics_server(settings.metrics_listen, "auth")
    freeze_startup_heap()
    asyncio.run(run(settings))


if __name__ == "__main__":
    main()
