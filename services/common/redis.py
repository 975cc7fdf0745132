"""Redis conventions shared by the services: one client factory and the names other services rely on."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

# Short timeouts: Redis is an accelerator on the request path; when it stalls, callers fall back.
REDIS_TIMEOUT_S = 0.5

# auth publishes a key id here whenever the key changes; every relay drops its cached principal.
KEY_INVALIDATION_CHANNEL = "relaygate:auth:invalidate"


def redis_client(url: str) -> Redis:
    return Redis.from_url(
        url,
        socket_timeout=REDIS_TIMEOUT_S,
        socket_connect_timeout=REDIS_TIMEOUT_S,
        retry=Retry(NoBackoff(), 1),
    )
