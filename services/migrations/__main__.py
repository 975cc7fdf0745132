from __future__ import annotations

import asyncio

from services.common.config import DatabaseSettings
from services.migrations import upgrade


def main() -> None:
    settings = DatabaseSettings()
    asyncio.run(upgrade(settings.database_url))


if __name__ == "__main__":
    main()
