"""``python -m services.quota``: serve QuotaService with settings from the ``RELAYGATE_*`` environment.

``python -m services.quota reconcile [--consistent]`` instead checks the books of
``RELAYGATE_DATABASE_URL`` once (:mod:`services.quota.reconcile`), prints every discrepancy and exits
with 1 when there is any, 0 when everything agrees.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from services.common.db import Database
from services.common.heap import freeze_startup_heap
from services.common.telemetry import setup_logging, start_metrics_server
from services.quota.app import run
from services.quota.reconcile import reconcile
from services.quota.settings import QuotaSettings


async def _reconcile(settings: QuotaSettings, *, consistent: bool) -> int:
    db = Database(settings)
    await db.start()
    try:
        found = await reconcile(db, consistent=consistent)
    finally:
        await db.close()
    for discrepancy in found:
        sys.stdout.write(discrepancy.describe() + "\n")
    sys.stdout.write(f"{len(found)} discrepancies\n" if found else "the books agree\n")
    return 1 if found else 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m services.quota")
    commands = parser.add_subparsers(dest="command")
    check = commands.add_parser("reconcile", help="check balances, charges and budgets against the ledger")
    check.add_argument("--consistent", action="store_true", help="read the primary instead of a replica")
    args = parser.parse_args(argv)

    settings = QuotaSettings()
    setup_logging("quota", level=settings.log_level, fmt=settings.log_format)
    if args.command == "reconcile":
        sys.exit(asyncio.run(_reconcile(settings, consistent=args.consistent)))
    start_metrics_server(settings.metrics_listen, "quota")
    freeze_startup_heap()
    asyncio.run(run(settings))


if __name__ == "__main__":
    main()
