"""``python -m services.quota``: serve QuotaService with settings from the ``RELAYGATE_*`` environment."""

from __future__ import annotations

import asyncio

from services.common.telemetry import setup_logging, start_metrics_server
from services.quota.app import run
from services.quota.settings import QuotaSettings


def main() -> None:
    settings = QuotaSettings()
    setup_logging("quota", level=settings.log_level, fmt=settings.log_format)
    start_metrics_server(settings.metrics_listen)
    asyncio.run(run(settings))


if __name__ == "__main__":
    main()
