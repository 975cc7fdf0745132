"""The response cache: exact-match answers for repeated deterministic requests, in Redis.

**Opt-in.** A request uses the cache when its key's metadata says ``{"cache": "on"}`` or it sends
``x-relaygate-cache: on``; ``x-relaygate-cache: off`` opts a single request out again.

**What is cacheable** (anything else bypasses the cache, whatever the opt-in):

* non-streaming ``chat.completions`` and ``completions`` with ``temperature`` explicitly 0 and one
  choice (``n`` absent or 1). An absent temperature means the provider's default (1 for OpenAI), so
  such a request is not deterministic and is not cached;
* ``embeddings``, which are deterministic by nature;
* never images (each call is a new draw), never streams, never non-2xx answers.

**The key** is the SHA-256 of the request body with sorted keys, minus the fields that do not change
the answer (``user``, ``stream``, ``stream_options``, ``metadata``, ``store``), namespaced by the
endpoint and the caller's scope: the API key by default, or every key of the same user
(``response_cache_scope=user``). Two keys never share entries unless configured so.

**Billing** of a hit follows ``response_cache_billing``: ``free`` (the default: no reservation, a
usage event with the cached token counts, ``cached=true`` and no cost; without a reservation a hit
does not count against RPM/TPM limits either) or ``full`` (reserved and settled like an upstream
answer, with the cached usage, and limited like one).

Redis trouble never fails a request: a lookup that errors is a miss, a store that errors is skipped
(``relaygate_response_cache{result="error"}``). A miss is stored in the background
(:meth:`ResponseCache.keep`), so storing never delays an answer on either front (a unary gRPC reply
leaves only when its handler returns); stores still pending when the relay stops get a second.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.common.pb.relaygate.auth.v1.auth_pb2 import Principal
from services.common.pb.relaygate.common.v1.types_pb2 import Usage
from services.common.telemetry import METRICS
from services.relay.meter.accounting import metric

log = logging.getLogger(__name__)

__all__ = ["CachedReply", "ResponseCache", "cache_requested"]

_IGNORED_FIELDS = ("user", "stream", "stream_options", "metadata", "store")
_PREFIX = "relaygate:cache:v1"


def cache_requested(principal: Principal, header: str | None) -> bool:
    """Whether this request opted in: by the request header, else by the key's metadata."""
    if header is not None:
        return header.strip().lower() == "on"
    return principal.metadata.get("cache", "").strip().lower() == "on"


def deterministic(endpoint: str, body: dict[str, Any]) -> bool:
    """Whether the same request must get the same answer (see the module docstring)."""
    if endpoint == "embeddings":
        return True
    if endpoint not in ("chat.completions", "completions") or body.get("stream") is True:
        return False
    temperature = body.get("temperature")
    n = body.get("n")
    return (
        isinstance(temperature, int | float)
        and not isinstance(temperature, bool)
        and temperature == 0
        and (n is None or n == 1)
    )


@dataclass(frozen=True, slots=True)
class CachedReply:
    content_type: bytes
    body: bytes
    usage: Usage


class ResponseCache:
    """Lookups and stores in Redis; owned by the lifespan (which owns the Redis client)."""

    def __init__(
        self,
        redis: Redis,
        *,
        ttl_s: int,
        max_bytes: int,
        scope: Literal["key", "user"],
        billing: Literal["free", "full"],
    ) -> None:
        self._redis = redis
        self._ttl = ttl_s
        self._max_bytes = max_bytes
        self._scope = scope
        self.free_hits = billing == "free"
        self._stores: set[asyncio.Task[None]] = set()

    def key_for(self, endpoint: str, body: dict[str, Any], principal: Principal) -> str | None:
        """The entry for this request, or None when it is not cacheable."""
        if not deterministic(endpoint, body):
            return None
        normalized = {k: v for k, v in body.items() if k not in _IGNORED_FIELDS}
        digest = hashlib.sha256(orjson.dumps(normalized, option=orjson.OPT_SORT_KEYS)).hexdigest()
        owner = principal.key_id if self._scope == "key" else f"u:{principal.user_id}"
        return f"{_PREFIX}:{owner}:{endpoint}:{digest}"

    async def get(self, key: str) -> CachedReply | None:
        try:
            value = await self._redis.get(key)
        except (RedisError, OSError) as exc:
            metric(METRICS.response_cache, "error").inc()
            log.warning("response cache lookup failed: %s", exc)
            return None
        if not isinstance(value, bytes):
            metric(METRICS.response_cache, "miss").inc()
            return None
        meta_end = value.find(b"\n")
        try:
            meta = orjson.loads(value[:meta_end])
            # Entries stored before the cache-write and reasoning counts have four numbers.
            prompt, completion, cached, images, *kinds = meta["u"]
            cache_write, reasoning = kinds or (0, 0)
            usage = Usage(
                prompt_tokens=prompt,
                completion_tokens=completion,
                cached_prompt_tokens=cached,
                images=images,
                cache_write_tokens=cache_write,
                reasoning_tokens=reasoning,
            )
            reply = CachedReply(meta["ct"].encode(), value[meta_end + 1 :], usage)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            metric(METRICS.response_cache, "error").inc()
            return None
        metric(METRICS.response_cache, "hit").inc()
        return reply

    def keep(self, key: str, content_type: bytes, body: bytes, usage: Usage) -> None:
        """Store a miss in the background."""
        task = asyncio.get_running_loop().create_task(self.put(key, content_type, body, usage))
        self._stores.add(task)
        task.add_done_callback(self._stores.discard)

    async def close(self, timeout_s: float = 1.0) -> None:
        """Give the pending stores ``timeout_s`` to finish (a lost store is only a later miss)."""
        if not self._stores:
            return
        _, late = await asyncio.wait(set(self._stores), timeout=timeout_s)
        for task in late:
            task.cancel()

    async def put(self, key: str, content_type: bytes, body: bytes, usage: Usage) -> None:
        if len(body) > self._max_bytes:
            return
        meta = orjson.dumps(
            {
                "ct": content_type.decode("latin-1"),
                "u": [
                    usage.prompt_tokens,
                    usage.completion_tokens,
                    usage.cached_prompt_tokens,
                    usage.images,
                    usage.cache_write_tokens,
                    usage.reasoning_tokens,
                ],
            }
        )
        try:
            await self._redis.set(key, meta + b"\n" + body, ex=self._ttl)
        except (RedisError, OSError) as exc:
            metric(METRICS.response_cache, "error").inc()
            log.warning("response cache store failed: %s", exc)
            return
        metric(METRICS.response_cache, "store").inc()
