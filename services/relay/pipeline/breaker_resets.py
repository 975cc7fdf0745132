"""Closing a channel's breaker on every relay of the deployment, not only the one the admin reached.

Each relay keeps its own breakers, so the admin route publishes the channel id on Redis and every relay
closes its breaker when it hears it, over the subscription that already follows auth's key changes
(:class:`~services.relay.pipeline.principals.InvalidationListener`). Redis answers a publication with
the number of subscribers it reached: the relays that took the reset. A relay that was not subscribed
at that moment (restarting, or Redis unreachable) misses it; the answer's count shows that. Without
Redis the answering relay is the whole deployment.
"""

from __future__ import annotations

import logging

from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.common.errors import ServiceUnavailable
from services.common.redis import breaker_reset_channel
from services.relay.upstream.breaker import Breakers

log = logging.getLogger(__name__)


class BreakerResets:
    """Publishes breaker resets and applies the ones this relay hears."""

    def __init__(self, redis: Redis | None, breakers: Breakers) -> None:
        self._redis = redis
        self._breakers = breakers
        self.channel = breaker_reset_channel(redis) if redis is not None else ""

    def heard(self, channel_id: str) -> None:
        """A reset announced on Redis (by any relay, this one included)."""
        if self._breakers.reset(channel_id):
            log.info("channel breaker closed by an operator", extra={"channel_id": channel_id})

    async def everywhere(self, channel_id: str) -> int:
        """Close ``channel_id``'s breaker here at once and on every relay following the announcements;
        the number of relays that took it."""
        self._breakers.reset(channel_id)
        if self._redis is None:
            return 1
        try:
            return int(await self._redis.publish(self.channel, channel_id))
        except (RedisError, OSError) as exc:
            raise ServiceUnavailable(
                f"The breaker was closed on this relay only: the other relays could not be told ({exc}).",
                retry_after=1.0,
            ) from exc
