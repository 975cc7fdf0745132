"""``python -m services.relay``: the HTTP front under uvicorn (bounded graceful shutdown on SIGTERM, see
:mod:`services.relay.edge.http.server`)."""

from __future__ import annotations

import uvicorn

from services.common.heap import freeze_startup_heap
from services.common.telemetry import setup_logging
from services.relay.edge.http.app import create_app
from services.relay.edge.http.http_protocol import ConnectionLimits, guarded_protocol
from services.relay.edge.http.server import RelayServer
from services.relay.settings import RelaySettings


def main() -> None:
    settings = RelaySettings()
    setup_logging("relay", level=settings.log_level, fmt=settings.log_format)
    config = uvicorn.Config(
        create_app(settings),
        host=settings.relay_host,
        port=settings.relay_port,
        loop="uvloop",
        http=guarded_protocol(
            ConnectionLimits(
                max_header_bytes=settings.max_header_bytes,
                max_header_count=settings.max_header_count,
                header_timeout_s=settings.header_timeout_s,
                body_timeout_s=settings.body_timeout_s,
            )
        ),
        ws="none",
        lifespan="on",
        access_log=False,
        log_config=None,
        # The relay reads X-Forwarded-For itself, only when told to (trust_forwarded_for); uvicorn's
        # default would rewrite the client address of any loopback peer, key IP scopes included.
        proxy_headers=False,
    )
    server = RelayServer(config, drain_s=settings.http_drain_s, timeout_s=settings.shutdown_timeout_s)
    # Everything imported and built so far lives as long as the process: out of every collection.
    freeze_startup_heap()
    server.run()


if __name__ == "__main__":
    main()
