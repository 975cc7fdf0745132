"""Redis conventions shared by the services: one client factory and the names other services rely on."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

# Short timeouts: Redis is an accelerator on the request path; when it stalls, callers fall back.
REDIS_TIMEOUT_S = 0.5

# auth publishes a key id here whenever the key changes; every relay drops its cached principal.
KEY_INVALIDATION_CHANNEL = "relaygate:auth:invalidate"
# The admin API publishes a channel id here; every relay closes that channel's breaker. Named with the
# database number: Redis delivers a publication to subscribers of every database, and a deployment's
# shared state lives in one database (two deployments on one server must not reset each other's).
_BREAKER_RESET_CHANNEL = "relaygate:relay:breaker-reset:{db}"


def breaker_reset_channel(redis: Redis) -> str:
    return _BREAKER_RESET_CHANNEL.format(db=redis.connection_pool.connection_kwargs.get("db", 0))


def redis_client(url: str) -> Redis:
    return Redis.from_url(
        url,
        socket_timeout=REDIS_TIMEOUT_S,
        socket_connect_timeout=REDIS_TIMEOUT_S,
        retry=Retry(NoBackoff(), 1),
    )
