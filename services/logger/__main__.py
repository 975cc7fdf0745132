"""``python -m services.logger``: Kafka usage events into request_logs, plus the gRPC reads of them."""

from __future__ import annotations

import asyncio
import logging

from services.common.heap import freeze_startup_heap
from services.common.telemetry import setup_logging, start_metrics_server
from services.logger.app import run
from services.logger.settings import LoggerSettings

log = logging.getLogger("services.logger")


def main() -> None:
    settings = LoggerSettings()
    setup_logging("logger", level=settings.log_level, fmt=settings.log_format)
    start_metrics_server(settings.metrics_listen, "logger")
    try:
        freeze_startup_heap()
        asyncio.run(run(settings))
    except Exception:
        log.exception("logger stopped on an error")
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
