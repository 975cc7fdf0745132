"""Who is calling: API key extraction, and verification through auth behind a short-TTL cache.

The cache is keyed by the SHA-256 of the key (never the plaintext) and holds the principal with
its scopes, so a hit is checked locally with the same rules auth applies. Entries are dropped when
auth announces a change to the key on the Redis invalidation channel, and expire after a few seconds
in any case (the bound when Redis is absent).
"""

from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING

from services.common.errors import AuthenticationError, PermissionDenied
from services.common.grpc import call
from services.common.pb.relaygate.auth.v1.auth_pb2 import DenyReason, Principal, VerifyKeyRequest
from services.common.scopes import check
from services.common.telemetry import METRICS

if TYPE_CHECKING:
    from services.common.pb.relaygate.auth.v1.auth_pb2_grpc import AuthServiceAsyncStub

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
        self._hits = METRICS.auth_verify.labels(outcome="ok", source="relay_cache")
        self._misses = METRICS.auth_verify.labels(outcome="ok", source="auth")

    async def authenticate(self, api_key: str, *, model: str, client_ip: str) -> Principal:
        """The principal for ``api_key`` if it may call ``model`` from ``client_ip``; raises otherwise."""
        digest = hashlib.sha256(api_key.encode()).hexdigest()
        now = time.monotonic()
        entry = self._entries.get(digest)
        if entry is not None and entry[1] > now:
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
                self._store(digest, response.principal, now)
            raise deny(response.deny_reason, response.message)
        self._misses.inc()
        self._store(digest, response.principal, now)
        return response.principal

    def _store(self, digest: str, principal: Principal, now: float) -> None:
        if not principal.key_id or self._ttl <= 0:
            return
        if len(self._entries) >= _MAX_ENTRIES:
            self._entries.clear()
        self._entries[digest] = (principal, now + self._ttl)

    def invalidate_key(self, key_id: str) -> None:
        """Drop every cached entry of ``key_id`` (called when auth announces a change)."""
        for digest in [d for d, (p, _) in self._entries.items() if p.key_id == key_id]:
            self._entries.pop(digest, None)

    def clear(self) -> None:
        self._entries.clear()
