"""Who is calling: API key extraction, and verification through auth behind a short-TTL cache.

The cache is keyed by the SHA-256 of the key (never the plaintext) and holds the principal with
its scopes, so a hit is checked locally with the same rules auth applies. Entries are dropped when
auth announces a change to the key on the Redis invalidation channel, and expire after a few seconds
in any case (the bound when Redis is absent).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from typing import TYPE_CHECKING

from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.common.errors import AuthenticationError, PermissionDenied
from services.common.grpc import call
from services.common.pb.relaygate.auth.v1.auth_pb2 import DenyReason, Principal, VerifyKeyRequest
from services.common.redis import KEY_INVALIDATION_CHANNEL
from services.common.scopes import check
from services.common.telemetry import METRICS

if TYPE_CHECKING:
    from services.common.pb.relaygate.auth.v1.auth_pb2_grpc import AuthServiceAsyncStub

log = logging.getLogger(__name__)

_MAX_ENTRIES = 100_000
_DENY_ERRORS: dict[int, type[AuthenticationError] | type[PermissionDenied]] = {
    DenyReason.DENY_REASON_MALFORMED: AuthenticationError,
    DenyReason.DENY_REASON_UNKNOWN: AuthenticationError,
    DenyReason.DENY_REASON_REVOKED: AuthenticationError,
    DenyReason.DENY_REASON_EXPIRED: AuthenticationError,
    DenyReason.DENY_REASON_DISABLED: AuthenticationError,
    DenyReason.DENY_REASON_MODEL_NOT_ALLOWED: PermissionDenied,
    DenyReason.DENY_REASON_IP_NOT_ALLOWED: PermissionDenied,
}


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


class Authenticator:
    """Resolves keys to principals; owned by the relay's lifespan."""

    def __init__(self, stub: AuthServiceAsyncStub, *, ttl_s: float, rpc_timeout_s: float) -> None:
        self._stub = stub
        self._ttl = ttl_s
        self._timeout = rpc_timeout_s
        self._entries: dict[str, tuple[Principal, float]] = {}
        self._digests_by_key: dict[str, set[str]] = {}
        # key id -> when it was last invalidated; an answer that left auth before that is not cached.
        self._invalidated: dict[str, float] = {}
        self._hits = METRICS.auth_verify.labels(outcome="ok", source="relay_cache")
        self._misses = METRICS.auth_verify.labels(outcome="ok", source="auth")

    async def authenticate(self, api_key: str, *, model: str, client_ip: str) -> Principal:
        """The principal for ``api_key`` if it may call ``model`` from ``client_ip``; raises otherwise."""
        digest = hashlib.sha256(api_key.encode()).hexdigest()
        asked_at = time.monotonic()
        entry = self._entries.get(digest)
        if entry is not None and entry[1] > asked_at:
            principal = entry[0]
            reason, message = check(principal, model=model, client_ip=client_ip, now=time.time())
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
            if response.deny_reason in (
                DenyReason.DENY_REASON_MODEL_NOT_ALLOWED,
                DenyReason.DENY_REASON_IP_NOT_ALLOWED,
            ):
                self._store(digest, response.principal, asked_at)
            raise deny(response.deny_reason, response.message)
        self._misses.inc()
        self._store(digest, response.principal, asked_at)
        return response.principal

    def _store(self, digest: str, principal: Principal, asked_at: float) -> None:
        key_id = principal.key_id
        if not key_id or self._ttl <= 0 or self._invalidated.get(key_id, -1.0) >= asked_at:
            return
        if len(self._entries) >= _MAX_ENTRIES:
            self.clear()
        self._entries[digest] = (principal, asked_at + self._ttl)
        self._digests_by_key.setdefault(key_id, set()).add(digest)

    def invalidate_key(self, key_id: str) -> None:
        """Drop every cached entry of ``key_id`` (auth announced a change to it)."""
        now = time.monotonic()
        self._invalidated[key_id] = now
        for digest in self._digests_by_key.pop(key_id, ()):
            self._entries.pop(digest, None)
        if len(self._invalidated) > _MAX_ENTRIES:
            horizon = now - 60
            self._invalidated = {k: t for k, t in self._invalidated.items() if t > horizon}

    def clear(self) -> None:
        self._entries.clear()
        self._digests_by_key.clear()


class InvalidationListener:
    """Follows auth's key-change announcements on Redis and drops the affected cache entries.

    While Redis is unreachable the cache keeps working with its TTL as the bound; on reconnect the
    whole cache is dropped, since announcements made meanwhile were missed.
    """

    def __init__(self, redis: Redis, authenticator: Authenticator) -> None:
        self._redis = redis
        self._authenticator = authenticator
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="key-invalidation")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                async with self._redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(KEY_INVALIDATION_CHANNEL)
                    if failures:
                        log.info("key invalidations followed again; cache dropped")
                        self._authenticator.clear()
                    failures = 0
                    while True:
                        message = await pubsub.get_message(timeout=30.0)
                        if message is not None and message.get("type") == "message":
                            data = message["data"]
                            self._authenticator.invalidate_key(
                                data.decode() if isinstance(data, bytes) else str(data)
                            )
            except (RedisError, OSError) as exc:
                if failures == 0:
                    log.warning("cannot follow key invalidations: %s", exc)
                failures += 1
                self._authenticator.clear()
                await asyncio.sleep(min(1.0, 0.1 * failures))
