"""The verified-principal cache, keyed by the SHA-256 fingerprint of the key (never the key itself).

Two implementations share one contract (:class:`PrincipalCache`): :class:`RedisPrincipalCache`, shared by
every auth replica, and :class:`MemoryPrincipalCache` for the embedded single-process default. Only
principals of valid keys are stored; scope checks (expiry, model, address) run on every request anyway.

Invalidation. auth cannot rebuild a fingerprint from the database (it stores no hash of the whole key),
so every entry is also listed under its key id (``relaygate:auth:key:<key_id>``). Changing a key deletes
all its entries and publishes the key id on :data:`INVALIDATE_CHANNEL` for caches outside auth. A short
tombstone (``relaygate:auth:tombstone:<key_id>``) refuses writes for that key for :data:`TOMBSTONE_S`, so
a verification that read the key just before the change cannot put the old principal back afterwards.

Redis failures never fail a verification: the cache answers "miss", the caller reads the database, the
outage is logged once, and Redis is tried again after ``retry_after_s``. There is deliberately no
in-process fallback while Redis is down: invalidations from other replicas could not reach it.
Invalidations that fail are retried before the next read once Redis answers again.
"""

from __future__ import annotations

import logging
from typing import Protocol

from google.protobuf.message import DecodeError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.common.clock import Clock
from services.common.pb.relaygate.auth.v1.auth_pb2 import Principal
from services.common.redis import KEY_INVALIDATION_CHANNEL

log = logging.getLogger(__name__)

PRINCIPAL_KEY = "relaygate:auth:principal:{}"
KEY_INDEX = "relaygate:auth:key:{}"
TOMBSTONE_KEY = "relaygate:auth:tombstone:{}"
INVALIDATE_CHANNEL = KEY_INVALIDATION_CHANNEL

# Longer than any verification takes from its database read to its cache write (RPC deadlines are ~2 s).
TOMBSTONE_S = 10.0

_REDIS_ERRORS = (RedisError, OSError)

# KEYS: tombstone, principal entry, key index. ARGV: principal bytes, ttl ms, fingerprint.
# The index lives as long as its newest entry, hence at least as long as every entry it lists.
_PUT_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
redis.call('SADD', KEYS[3], ARGV[3])
redis.call('PEXPIRE', KEYS[3], ARGV[2])
return 1
"""

# KEYS: tombstone, key index. ARGV: tombstone ms, principal key prefix. Returns the entries deleted.
_INVALIDATE_SCRIPT = """
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
local fingerprints = redis.call('SMEMBERS', KEYS[2])
for _, fp in ipairs(fingerprints) do redis.call('DEL', ARGV[2] .. fp) end
redis.call('DEL', KEYS[2])
return #fingerprints
"""


class PrincipalCache(Protocol):
    """Principals by key fingerprint, with invalidation by key id."""

    @property
    def name(self) -> str:
        """The layer's name in metrics: ``redis`` or ``memory``."""
        ...

    async def get(self, fingerprint: str) -> Principal | None:
        """The cached principal, or ``None`` on a miss (or when the cache is unavailable)."""
        ...

    async def put(self, fingerprint: str, principal: Principal) -> None:
        """Cache a principal of a valid key, unless its key was changed in the last TOMBSTONE_S."""
        ...

    async def invalidate(self, key_id: str) -> None:
        """Drop every entry of this key and announce it; never raises for cache outages."""
        ...


class MemoryPrincipalCache:
    """In-process cache for a single auth process (the embedded default); bounded, oldest evicted first."""

    def __init__(self, *, ttl_s: float, clock: Clock, max_entries: int = 100_000) -> None:
        self._ttl_s = ttl_s
        self._clock = clock
        self._max_entries = max_entries
        # fingerprint -> (expires at, monotonic; key id; serialized principal)
        self._entries: dict[str, tuple[float, str, bytes]] = {}
        self._by_key: dict[str, set[str]] = {}
        self._tombstones: dict[str, float] = {}

    @property
    def name(self) -> str:
        return "memory"

    async def get(self, fingerprint: str) -> Principal | None:
        entry = self._entries.get(fingerprint)
        if entry is None:
            return None
        expires, key_id, raw = entry
        if self._clock.monotonic() >= expires:
            self._drop(fingerprint, key_id)
            return None
        principal = Principal()
        principal.ParseFromString(raw)
        return principal

    async def put(self, fingerprint: str, principal: Principal) -> None:
        now = self._clock.monotonic()
        tombstone = self._tombstones.get(principal.key_id)
        if tombstone is not None:
            if now < tombstone:
                return
            del self._tombstones[principal.key_id]
        while len(self._entries) >= self._max_entries:
            oldest = next(iter(self._entries))
            self._drop(oldest, self._entries[oldest][1])
        self._entries[fingerprint] = (now + self._ttl_s, principal.key_id, principal.SerializeToString())
        self._by_key.setdefault(principal.key_id, set()).add(fingerprint)

    async def invalidate(self, key_id: str) -> None:
        now = self._clock.monotonic()
        self._tombstones = {k: until for k, until in self._tombstones.items() if until > now}
        self._tombstones[key_id] = now + TOMBSTONE_S
        for fingerprint in self._by_key.pop(key_id, set()):
            self._entries.pop(fingerprint, None)

    def _drop(self, fingerprint: str, key_id: str) -> None:
        self._entries.pop(fingerprint, None)
        siblings = self._by_key.get(key_id)
        if siblings is not None:
            siblings.discard(fingerprint)
            if not siblings:
                del self._by_key[key_id]


class RedisPrincipalCache:
    """Cache shared through Redis: values are serialized ``Principal`` messages with a TTL."""

    def __init__(self, redis: Redis, *, ttl_s: float, clock: Clock, retry_after_s: float = 1.0) -> None:
        self._redis = redis
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._clock = clock
        self._retry_after_s = retry_after_s
        self._put_script = redis.register_script(_PUT_SCRIPT)
        self._invalidate_script = redis.register_script(_INVALIDATE_SCRIPT)
        self._available = True
        self._retry_at = 0.0
        # Key ids whose invalidation failed during an outage; replayed before the next read.
        self._pending: set[str] = set()

    @property
    def name(self) -> str:
        return "redis"

    @property
    def available(self) -> bool:
        """False from a failed call until a later call succeeds."""
        return self._available

    async def get(self, fingerprint: str) -> Principal | None:
        if not self._should_try():
            return None
        try:
            if self._pending:
                await self._replay_invalidations()
            raw = await self._redis.get(PRINCIPAL_KEY.format(fingerprint))
        except _REDIS_ERRORS as exc:
            self._failed(exc)
            return None
        self._succeeded()
        if raw is None:
            return None
        principal = Principal()
        try:
            # The client never decodes responses, so values arrive as bytes.
            principal.ParseFromString(raw if isinstance(raw, bytes) else raw.encode())
        except DecodeError:
            log.warning("undecodable principal in the cache; treating it as a miss")
            return None
        return principal

    async def put(self, fingerprint: str, principal: Principal) -> None:
        if not self._should_try():
            return
        keys = [
            TOMBSTONE_KEY.format(principal.key_id),
            PRINCIPAL_KEY.format(fingerprint),
            KEY_INDEX.format(principal.key_id),
        ]
        try:
            await self._put_script(keys=keys, args=[principal.SerializeToString(), self._ttl_ms, fingerprint])
        except _REDIS_ERRORS as exc:
            self._failed(exc)
            return
        self._succeeded()

    async def invalidate(self, key_id: str) -> None:
        try:
            await self._invalidate(key_id)
        except _REDIS_ERRORS as exc:
            self._pending.add(key_id)
            self._failed(exc)
            return
        self._succeeded()

    async def _invalidate(self, key_id: str) -> None:
        keys = [TOMBSTONE_KEY.format(key_id), KEY_INDEX.format(key_id)]
        await self._invalidate_script(keys=keys, args=[int(TOMBSTONE_S * 1000), PRINCIPAL_KEY.format("")])
        await self._redis.publish(INVALIDATE_CHANNEL, key_id)

    async def _replay_invalidations(self) -> None:
        for key_id in list(self._pending):
            await self._invalidate(key_id)
            self._pending.discard(key_id)
        log.info("replayed key invalidations held during the Redis outage")

    def _should_try(self) -> bool:
        return self._available or self._clock.monotonic() >= self._retry_at

    def _failed(self, exc: Exception) -> None:
        self._retry_at = self._clock.monotonic() + self._retry_after_s
        if self._available:
            self._available = False
            log.warning(
                "redis unavailable: verifying keys from the database until it answers again",
                extra={"error": f"{type(exc).__name__}: {exc}"[:200]},
            )

    def _succeeded(self) -> None:
        if not self._available:
            self._available = True
            log.info("redis answers again: principal cache back in use")
