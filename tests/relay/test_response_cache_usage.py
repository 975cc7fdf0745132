"""The response cache keeps every token kind of a cached answer's usage, so a hit billed in full is
billed like the answer it repeats (cache writes and reasoning at their own prices)."""

from __future__ import annotations

import uuid

import orjson
from redis.asyncio import Redis

from services.common.pb.relaygate.common.v1.types_pb2 import Usage
from services.relay.pipeline.cache import ResponseCache


def _cache(redis: Redis) -> ResponseCache:
    return ResponseCache(redis, ttl_s=60, max_bytes=10_000, scope="key", billing="full")


async def test_a_hit_carries_cache_writes_and_reasoning(redis: Redis) -> None:
    key = f"test-cache-kinds:{uuid.uuid4().hex}"
    usage = Usage(
        prompt_tokens=4, completion_tokens=8, cached_prompt_tokens=2, cache_write_tokens=3, reasoning_tokens=5
    )
    await _cache(redis).put(key, b"application/json", b"{}", usage)
    hit = await _cache(redis).get(key)
    assert hit is not None and hit.usage == usage


async def test_an_entry_stored_before_the_token_kinds_is_still_a_hit(redis: Redis) -> None:
    key = f"test-cache-kinds:{uuid.uuid4().hex}"
    await redis.set(key, orjson.dumps({"ct": "application/json", "u": [4, 8, 2, 0]}) + b"\n{}", ex=60)
    hit = await _cache(redis).get(key)
    assert hit is not None
    assert hit.usage == Usage(prompt_tokens=4, completion_tokens=8, cached_prompt_tokens=2)


async def test_a_miss_kept_in_the_background_is_stored_by_close(redis: Redis) -> None:
    key = f"test-cache-kinds:{uuid.uuid4().hex}"
    cache = _cache(redis)
    usage = Usage(prompt_tokens=1, completion_tokens=2)
    cache.keep(key, b"application/json", b'{"kept": true}', usage)
    await cache.close()
    hit = await _cache(redis).get(key)
    assert hit is not None and hit.body == b'{"kept": true}' and hit.usage == usage
