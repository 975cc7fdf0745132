"""The principal cache: Redis layout, invalidation and tombstones, verification through a Redis outage."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from devinfra.backing import BackingServices
from services.auth import keys
from services.auth.cache import (
    INVALIDATE_CHANNEL,
    KEY_INDEX,
    PRINCIPAL_KEY,
    TOMBSTONE_KEY,
    TOMBSTONE_S,
    MemoryPrincipalCache,
    RedisPrincipalCache,
)
from services.common.clock import ManualClock, SystemClock
from services.common.ids import new_id
from services.common.pb.relaygate.auth.v1 import auth_pb2 as pb
from tests.auth.harness import RunningAuth


def principal() -> pb.Principal:
    return pb.Principal(key_id=new_id("key"), user_id=new_id("usr"), allowed_models=["gpt-4o*"])


def verified(source: str) -> float:
    value = REGISTRY.get_sample_value("relaygate_auth_verify_total", {"outcome": "ok", "source": source})
    return value or 0.0


async def next_message(pubsub: PubSub, timeout: float = 5.0) -> dict[str, Any] | None:
    """The next published message (subscription confirmations are skipped), or None after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message: dict[str, Any] | None = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
        if message is not None:
            return message
    return None


async def test_redis_entries_are_keyed_by_fingerprint_and_indexed_by_key(redis: Redis) -> None:
    cache = RedisPrincipalCache(redis, ttl_s=30, clock=SystemClock())
    plaintext, _, secret = keys.generate()
    fingerprint = keys.fingerprint(plaintext)
    entry = principal()

    await cache.put(fingerprint, entry)

    assert await cache.get(fingerprint) == entry
    assert await redis.get(PRINCIPAL_KEY.format(fingerprint)) == entry.SerializeToString()
    assert 0 < await redis.pttl(PRINCIPAL_KEY.format(fingerprint)) <= 30_000
    assert await redis.smembers(KEY_INDEX.format(entry.key_id)) == {fingerprint.encode()}
    async for name in redis.scan_iter(match="relaygate:auth:*"):
        assert secret.encode() not in name
        assert plaintext.encode() not in name


async def test_invalidation_drops_every_entry_of_the_key_publishes_and_blocks_stale_writes(
    redis: Redis,
) -> None:
    cache = RedisPrincipalCache(redis, ttl_s=30, clock=SystemClock())
    entry, other = principal(), principal()
    fingerprints = [keys.fingerprint(keys.generate()[0]) for _ in range(3)]
    for fingerprint in fingerprints[:2]:
        await cache.put(fingerprint, entry)
    await cache.put(fingerprints[2], other)

    async with redis.pubsub() as pubsub:
        await pubsub.subscribe(INVALIDATE_CHANNEL)
        await cache.invalidate(entry.key_id)
        message = await next_message(pubsub)

    assert message is not None and message["data"] == entry.key_id.encode()
    assert await cache.get(fingerprints[0]) is None
    assert await cache.get(fingerprints[1]) is None
    assert await cache.get(fingerprints[2]) == other
    assert not await redis.exists(KEY_INDEX.format(entry.key_id))
    # A verification that read the key before the change must not put the old principal back.
    assert 0 < await redis.pttl(TOMBSTONE_KEY.format(entry.key_id)) <= TOMBSTONE_S * 1000
    await cache.put(fingerprints[0], entry)
    assert await cache.get(fingerprints[0]) is None


async def test_invalidation_during_an_outage_is_replayed_when_redis_returns(
    redis: Redis, backing: BackingServices
) -> None:
    cache = RedisPrincipalCache(redis, ttl_s=30, clock=SystemClock(), retry_after_s=0.05)
    key_id = new_id("key")
    backing.stop_redis()
    try:
        await cache.invalidate(key_id)  # must not raise
        available_during_outage = cache.available
        assert await cache.get(keys.fingerprint(keys.generate()[0])) is None
    finally:
        backing.start_redis()

    listener = Redis.from_url(backing.redis_url)
    try:
        async with listener.pubsub() as pubsub:
            await pubsub.subscribe(INVALIDATE_CHANNEL)
            await asyncio.sleep(0.1)  # past retry_after_s
            assert await cache.get(keys.fingerprint(keys.generate()[0])) is None
            message = await next_message(pubsub)
    finally:
        await listener.aclose()
    assert not available_during_outage
    assert cache.available
    assert message is not None and message["data"] == key_id.encode()
    assert await redis.exists(TOMBSTONE_KEY.format(key_id))


async def test_memory_cache_ttl_invalidation_tombstone_and_bound() -> None:
    clock = ManualClock()
    cache = MemoryPrincipalCache(ttl_s=10, clock=clock, max_entries=3)
    entry = principal()
    await cache.put("fp-1", entry)
    await cache.put("fp-2", entry)
    assert await cache.get("fp-1") == entry

    clock.advance(10)
    assert await cache.get("fp-1") is None  # expired

    await cache.put("fp-1", entry)
    await cache.invalidate(entry.key_id)
    assert await cache.get("fp-1") is None
    await cache.put("fp-1", entry)
    assert await cache.get("fp-1") is None  # tombstoned
    clock.advance(TOMBSTONE_S)
    await cache.put("fp-1", entry)
    assert await cache.get("fp-1") == entry

    for n in range(2, 6):
        await cache.put(f"fp-{n}", principal())
    assert await cache.get("fp-1") is None  # the oldest entry made room
    assert await cache.get("fp-5") is not None


async def test_verification_survives_a_redis_outage_and_uses_the_cache_again_after(
    auth: RunningAuth, backing: BackingServices, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    user = await auth.create_user("outage")
    created = await auth.create_key(user.user_id)
    entry = PRINCIPAL_KEY.format(keys.fingerprint(created.api_key))
    assert (await auth.verify(created.api_key)).principal.key_id == created.key.key_id
    before = verified("redis")
    assert (await auth.verify(created.api_key)).principal.key_id == created.key.key_id
    assert verified("redis") == before + 1
    assert await redis.exists(entry)

    other = await auth.create_key(user.user_id)
    caplog.set_level(logging.INFO, logger="services.auth.cache")
    backing.stop_redis()
    try:
        from_db = verified("database")
        for _ in range(5):
            started = time.monotonic()
            response = await auth.verify(created.api_key)
            assert response.principal.key_id == created.key.key_id
            assert time.monotonic() - started < 2.0
        assert verified("database") == from_db + 5
        # Revocation still takes effect while the cache is unreachable.
        await auth.revoke(other.key.key_id)
        assert (await auth.verify(other.api_key)).deny_reason == pb.DenyReason.DENY_REASON_REVOKED
    finally:
        backing.start_redis()

    outage_logs = [r for r in caplog.records if "redis unavailable" in r.getMessage()]
    assert len(outage_logs) == 1  # logged once per outage, not per request

    deadline = time.monotonic() + 10
    while not await _exists(redis, entry):
        assert time.monotonic() < deadline, "the cache was not refilled after Redis returned"
        assert (await auth.verify(created.api_key)).principal.key_id == created.key.key_id
        await asyncio.sleep(0.1)
    before = verified("redis")
    assert (await auth.verify(created.api_key)).principal.key_id == created.key.key_id
    assert verified("redis") == before + 1
    assert any("answers again" in r.getMessage() for r in caplog.records)


async def _exists(redis: Redis, name: str) -> bool:
    try:
        return bool(await redis.exists(name))
    except (RedisError, OSError):
        return False
