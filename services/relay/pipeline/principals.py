"""Who is calling: API key extraction, and verification through auth behind an in-process cache.

The cache is keyed by the SHA-256 of the key (never the plaintext) and holds each principal serialized
(about 0.5 KiB an entry, against 2 KiB for a live message), so a hit parses it (0.4 µs) and checks its
scopes locally with the same rules auth applies. Only principals are cached: an unknown, revoked or
disabled key is asked of auth every time, so a new key works at once.

How long an entry is trusted depends on whether this relay follows auth's key-change announcements
(Redis pub/sub, :class:`InvalidationListener`):

- **following** (subscribed, confirmed by Redis): ``ttl_s``, long (minutes). Every change auth makes to a
  key (revoke, rotate, any field of UpdateKey) drops its entries within a round trip; the TTL is only a
  safety net for changes made outside auth.
- **not following** (no Redis, the subscription not confirmed yet, or lost): ``fallback_ttl_s``, a few
  seconds, counted from when the entry was verified, so entries older than that are dropped the moment
  the subscription is found lost.

Announcements published while the relay was not subscribed are lost, so every subscription confirmation,
including the client's silent reconnects, empties the cache, and an answer from auth asked before it (or
before its key's last invalidation) is not cached. The cache holds at most ``max_entries`` principals and
evicts the least recently used one, so any number of quiet keys costs bounded memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, NamedTuple

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from services.common.clock import Clock, SystemClock
from services.common.errors import AuthenticationError, PermissionDenied
from services.common.grpc import call
from services.common.pb.relaygate.auth.v1.auth_pb2 import DenyReason, Principal, VerifyKeyRequest
from services.common.redis import KEY_INVALIDATION_CHANNEL
from services.common.scopes import check
from services.common.tasks import cancel_and_wait
from services.common.telemetry import METRICS

if TYPE_CHECKING:
    from services.common.pb.relaygate.auth.v1.auth_pb2_grpc import AuthServiceAsyncStub

log = logging.getLogger(__name__)

_DENY_ERRORS: dict[int, type[AuthenticationError] | type[PermissionDenied]] = {
    DenyReason.DENY_REASON_MALFORMED: AuthenticationError,
    DenyReason.DENY_REASON_UNKNOWN: AuthenticationError,
    DenyReason.DENY_REASON_REVOKED: AuthenticationError,
    DenyReason.DENY_REASON_EXPIRED: AuthenticationError,
    DenyReason.DENY_REASON_DISABLED: AuthenticationError,
    DenyReason.DENY_REASON_MODEL_NOT_ALLOWED: PermissionDenied,
    DenyReason.DENY_REASON_IP_NOT_ALLOWED: PermissionDenied,
}
# Refusals that come with the key's principal: the key is valid, only this request is out of its scope.
_SCOPE_DENIALS = frozenset({DenyReason.DENY_REASON_MODEL_NOT_ALLOWED, DenyReason.DENY_REASON_IP_NOT_ALLOWED})


def extract_api_key(authorization: str | None, x_api_key: str | None) -> str:
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    if x_api_key and x_api_key.strip():
        return x_api_key.strip()
    raise AuthenticationError(
        "You didn't provide an API key. Send it as 'Authorization: Bearer <key>' (or the 'x-api-key' header)."
    )


def deny(reason: int, message: str) -> AuthenticationError | PermissionDenied:
    return _DENY_ERRORS.get(reason, AuthenticationError)(message or "Incorrect API key provided.")


class _Entry(NamedTuple):
    principal: bytes  # serialized
    key_id: str
    verified_at: float  # monotonic, when auth was asked


class Authenticator:
    """Resolves keys to principals; owned by the relay's lifespan."""

    def __init__(
        self,
        stub: AuthServiceAsyncStub,
        *,
        ttl_s: float,
        fallback_ttl_s: float,
        max_entries: int,
        rpc_timeout_s: float,
        clock: Clock | None = None,
    ) -> None:
        self._stub = stub
        self._ttl = ttl_s
        self._fallback_ttl = min(fallback_ttl_s, ttl_s)
        self._max_entries = max(1, max_entries)
        self._timeout = rpc_timeout_s
        self._clock: Clock = clock or SystemClock()
        self._following = False
        # digest -> entry, least recently used first.
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        # key id -> the digest of its one valid plaintext (rotating a key invalidates it).
        self._digest_of_key: dict[str, bytes] = {}
        # Answers asked before either of these are not cached: they may predate a change announced since.
        self._cleared_at = -math.inf
        self._invalidated: OrderedDict[str, float] = OrderedDict()  # key id -> when, oldest first
        # An answer cannot be older than its RPC deadline; invalidations older than this are forgotten.
        self._invalidation_memory_s = 2 * rpc_timeout_s + 1.0
        self._hits = METRICS.auth_verify.labels(outcome="ok", source="relay_cache")
        self._misses = METRICS.auth_verify.labels(outcome="ok", source="auth")
        METRICS.relay_auth_cache_entries.set_function(self.__len__)
        METRICS.relay_key_invalidations_followed.set(0)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def following(self) -> bool:
        """Whether key changes reach this cache (entries then live ``ttl_s``, else ``fallback_ttl_s``)."""
        return self._following

    async def authenticate(self, api_key: str, *, model: str, client_ip: str) -> Principal:
        """The principal for ``api_key`` if it may call ``model`` from ``client_ip``; raises otherwise."""
        digest = hashlib.sha256(api_key.encode()).digest()
        asked_at = self._clock.monotonic()
        principal = self._lookup(digest, asked_at)
        if principal is not None:
            reason, message = check(principal, model=model, client_ip=client_ip, now=self._clock.time())
            if reason:
                METRICS.auth_verify.labels(outcome=DenyReason.Name(reason), source="relay_cache").inc()
                raise deny(reason, message)
            self._hits.inc()
            return principal
        response = await call(
            self._stub.VerifyKey,
            VerifyKeyRequest(api_key=api_key, client_ip=client_ip, model=model),
            timeout=self._timeout,
        )
        if response.deny_reason:
            METRICS.auth_verify.labels(outcome=DenyReason.Name(response.deny_reason), source="auth").inc()
            if response.deny_reason in _SCOPE_DENIALS:
                self._store(digest, response.principal, asked_at)
            raise deny(response.deny_reason, response.message)
        self._misses.inc()
        self._store(digest, response.principal, asked_at)
        return response.principal

    def _lookup(self, digest: bytes, now: float) -> Principal | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        if now - entry.verified_at >= (self._ttl if self._following else self._fallback_ttl):
            self._drop(digest, entry.key_id)
            return None
        self._entries.move_to_end(digest)
        return Principal.FromString(entry.principal)

    def _store(self, digest: bytes, principal: Principal, asked_at: float) -> None:
        key_id = principal.key_id
        lifetime = self._ttl if self._following else self._fallback_ttl
        if not key_id or lifetime <= 0 or asked_at <= self._cleared_at:
            return
        if self._invalidated.get(key_id, -math.inf) >= asked_at:
            return
        previous = self._digest_of_key.get(key_id)
        if previous is not None and previous != digest:
            self._entries.pop(previous, None)
        self._entries[digest] = _Entry(principal.SerializeToString(), key_id, asked_at)
        self._entries.move_to_end(digest)
        self._digest_of_key[key_id] = digest
        while len(self._entries) > self._max_entries:
            _, evicted = self._entries.popitem(last=False)
            self._digest_of_key.pop(evicted.key_id, None)

    def _drop(self, digest: bytes, key_id: str) -> None:
        self._entries.pop(digest, None)
        if self._digest_of_key.get(key_id) == digest:
            del self._digest_of_key[key_id]

    def invalidate_key(self, key_id: str) -> None:
        """Drop the cached entry of ``key_id`` (auth announced a change to it)."""
        now = self._clock.monotonic()
        self._invalidated[key_id] = now
        self._invalidated.move_to_end(key_id)
        horizon = now - self._invalidation_memory_s
        while self._invalidated:
            oldest, at = next(iter(self._invalidated.items()))
            if at > horizon:
                break
            del self._invalidated[oldest]
        digest = self._digest_of_key.pop(key_id, None)
        if digest is not None:
            self._entries.pop(digest, None)

    def invalidations_followed(self) -> None:
        """The subscription to key changes is (again) confirmed: what was announced before it may have been
        missed, so everything cached, or being verified, is dropped; from now on entries live ``ttl_s``."""
        self.clear()
        if not self._following:
            METRICS.relay_key_invalidations_followed.set(1)
        self._following = True

    def invalidations_lost(self) -> None:
        """Key changes may no longer arrive: entries live ``fallback_ttl_s`` from their verification."""
        if self._following:
            METRICS.relay_key_invalidations_followed.set(0)
        self._following = False

    def clear(self) -> None:
        self._cleared_at = self._clock.monotonic()
        self._entries.clear()
        self._digest_of_key.clear()


class _Silent(Exception):
    """The subscription's connection answered nothing, not even a ping, for too long."""


class InvalidationListener:
    """Follows auth's key-change announcements on Redis and drops the affected cache entries.

    Every subscription confirmation (the first, and each after the client reconnected, by itself or
    here) tells the authenticator it is following again; an error, or a connection silent for
    ``silence_s`` although pinged every ``probe_s``, tells it the announcements may be lost. ``also``
    maps more Redis channels to what to do with their messages (the admin API's breaker resets,
    :mod:`services.relay.pipeline.breaker_resets`), followed on the same subscription.
    """

    def __init__(
        self,
        redis: Redis,
        authenticator: Authenticator,
        *,
        probe_s: float = 1.0,
        silence_s: float = 3.0,
        clock: Clock | None = None,
        also: Mapping[str, Callable[[str], None]] | None = None,
    ) -> None:
        self._redis = redis
        self._also = dict(also or {})
        self._authenticator = authenticator
        self._probe_s = probe_s
        self._silence_s = silence_s
        self._clock: Clock = clock or SystemClock()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="key-invalidation")

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
        self._authenticator.invalidations_lost()

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(KEY_INVALIDATION_CHANNEL, *self._also)
                    await self._follow(pubsub, recovering=failures > 0)
            except (RedisError, OSError, _Silent) as exc:
                self._authenticator.invalidations_lost()
                if failures == 0:
                    log.warning("cannot follow key invalidations; trusting cached keys briefly: %s", exc)
                failures += 1
                await asyncio.sleep(min(1.0, 0.1 * failures))

    async def _follow(self, pubsub: PubSub, *, recovering: bool) -> None:
        heard_at = self._clock.monotonic()
        while True:
            message = await pubsub.get_message(timeout=self._probe_s)
            now = self._clock.monotonic()
            if message is not None:
                heard_at = now
                kind = message.get("type")
                if kind == "message":
                    data = _text(message["data"])
                    handler = self._also.get(_text(message["channel"]))
                    if handler is not None:
                        handler(data)
                    else:
                        self._authenticator.invalidate_key(data)
                elif kind == "subscribe" and _text(message["channel"]) == KEY_INVALIDATION_CHANNEL:
                    self._authenticator.invalidations_followed()
                    if recovering:
                        log.info("key invalidations followed again; cache dropped")
                        recovering = False
            elif now - heard_at >= self._silence_s:
                raise _Silent(f"no answer from Redis for {now - heard_at:.1f} s")
            else:
                # A dead connection can look like a quiet channel; only an answer tells them apart.
                await pubsub.ping()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
