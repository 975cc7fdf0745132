"""``relaygate.auth.v1.AuthService``: translation between protobuf messages and the auth modules.

Verification reads as: parse the key → ask the cache → on a miss, read the key and check its secret,
revocation and state → build the principal (and cache it) → check its scopes against this request.
Refusals are answers (``deny_reason``), not RPC errors; their messages never contain the key.
"""

from __future__ import annotations

from typing import Any

import grpc

from services.auth import keys
from services.auth.cache import PrincipalCache
from services.auth.store import AuthStore, Credential, KeyRecord, UserRecord
from services.auth.tokens import TokenAuthority
from services.common import scopes
from services.common.clock import Clock
from services.common.errors import AuthenticationError, InvalidRequest, PermissionDenied
from services.common.pb.relaygate.auth.v1 import auth_pb2 as pb
from services.common.pb.relaygate.auth.v1.auth_pb2_grpc import AuthServiceServicer
from services.common.pb.relaygate.common.v1.types_pb2 import Limits
from services.common.telemetry import METRICS

Context = grpc.aio.ServicerContext[Any, Any]
DenyReason = pb.DenyReason

# Spending caps are not auth's: they are quota's budgets (the admin API writes them there).
LIMIT_FIELDS = ("rpm", "tpm", "max_concurrency")
UPDATABLE_KEY_FIELDS = frozenset(
    {"name", "allowed_models", "allowed_cidrs", "expires_at", "enabled", "limits", "metadata"}
)

_DENIALS: dict[int, str] = {
    DenyReason.DENY_REASON_MALFORMED: "The API key is malformed: expected rg-<id>-<secret>.",
    DenyReason.DENY_REASON_UNKNOWN: "Incorrect API key provided.",
    DenyReason.DENY_REASON_REVOKED: "This API key has been revoked.",
    DenyReason.DENY_REASON_DISABLED: "This API key is disabled.",
}


def limits_to_dict(limits: Limits) -> dict[str, int]:
    """The stored form of limits: only the fields that are set (0 means no limit and is left out)."""
    values = {name: int(getattr(limits, name)) for name in LIMIT_FIELDS}
    if any(value < 0 for value in values.values()):
        raise InvalidRequest("Limits must not be negative (0 means no limit).", param="limits")
    return {name: value for name, value in values.items() if value}


def limits_from_dict(values: dict[str, int]) -> Limits:
    """Stored limits as a message; other names are ignored (written by a newer version, or budgets
    stored before they moved to quota: the migration ``auth_0001`` moves them)."""
    return Limits(**{name: int(values[name]) for name in LIMIT_FIELDS if name in values})


def scope_of(message: pb.CreateKeyRequest | pb.ApiKey) -> keys.KeyScope:
    """The scope fields shared by a new key's request and a stored key's message."""
    return keys.KeyScope(
        name=message.name,
        allowed_models=tuple(message.allowed_models),
        allowed_cidrs=tuple(message.allowed_cidrs),
        expires_at=message.expires_at,
        limits=limits_to_dict(message.limits),
        metadata=dict(message.metadata),
    )


def user_message(user: UserRecord) -> pb.User:
    return pb.User(
        user_id=user.id,
        name=user.name,
        email=user.email,
        admin=user.admin,
        created_at=user.created_at,
        limits=limits_from_dict(user.limits),
    )


def key_message(key: KeyRecord) -> pb.ApiKey:
    """A key as listed to administrators: no secret, no hash, only a display prefix."""
    return pb.ApiKey(
        key_id=key.id,
        user_id=key.user_id,
        name=key.name,
        allowed_models=key.allowed_models,
        allowed_cidrs=key.allowed_cidrs,
        expires_at=key.expires_at,
        enabled=key.enabled,
        revoked=key.revoked,
        limits=limits_from_dict(key.limits),
        metadata=key.metadata,
        created_at=key.created_at,
        last_used_at=key.last_used_at,
        display_prefix=keys.display_prefix(key.public_id),
    )


def principal_message(credential: Credential) -> pb.Principal:
    key, user = credential.key, credential.user
    return pb.Principal(
        key_id=key.id,
        user_id=user.id,
        key_name=key.name,
        allowed_models=key.allowed_models,
        allowed_cidrs=key.allowed_cidrs,
        expires_at=key.expires_at,
        key_limits=limits_from_dict(key.limits),
        user_limits=limits_from_dict(user.limits),
        admin=user.admin,
        metadata=key.metadata,
    )


class AuthServicer(AuthServiceServicer):
    def __init__(
        self, *, store: AuthStore, cache: PrincipalCache, pepper: str, tokens: TokenAuthority, clock: Clock
    ) -> None:
        self._store = store
        self._cache = cache
        self._pepper = pepper
        self._tokens = tokens
        self._clock = clock

    def _now(self) -> int:
        return int(self._clock.time())

    async def VerifyKey(self, request: pb.VerifyKeyRequest, context: Context) -> pb.VerifyKeyResponse:
        principal, reason, source = await self._resolve(request.api_key)
        message = _DENIALS.get(reason, "")
        if principal is not None:
            reason, message = scopes.check(
                principal, model=request.model, client_ip=request.client_ip, now=self._clock.time()
            )
        outcome = "ok" if reason == DenyReason.DENY_REASON_UNSPECIFIED else _outcome(reason)
        METRICS.auth_verify.labels(outcome=outcome, source=source).inc()
        if principal is None or reason != DenyReason.DENY_REASON_UNSPECIFIED:
            return pb.VerifyKeyResponse(deny_reason=reason, message=message)
        self._store.touch_last_used(principal.key_id, self._now())
        return pb.VerifyKeyResponse(principal=principal)

    async def _resolve(self, api_key: str) -> tuple[pb.Principal | None, DenyReason.ValueType, str]:
        """The principal of a valid key (or the reason there is none), and which layer answered."""
        parsed = keys.parse(api_key)
        if parsed is None:
            return None, DenyReason.DENY_REASON_MALFORMED, "none"
        public_id, secret = parsed
        fingerprint = keys.fingerprint(api_key)
        cached = await self._cache.get(fingerprint)
        if cached is not None:
            return cached, DenyReason.DENY_REASON_UNSPECIFIED, self._cache.name
        credential = await self._store.find_credential(public_id)
        stored_hash = credential.key.secret_hash if credential is not None else None
        # Only a holder of the right secret learns anything about the key's state.
        if credential is None or not keys.verify_secret(self._pepper, secret, stored_hash):
            return None, DenyReason.DENY_REASON_UNKNOWN, "database"
        if credential.key.revoked:
            return None, DenyReason.DENY_REASON_REVOKED, "database"
        if not credential.key.enabled:
            return None, DenyReason.DENY_REASON_DISABLED, "database"
        principal = principal_message(credential)
        await self._cache.put(fingerprint, principal)
        return principal, DenyReason.DENY_REASON_UNSPECIFIED, "database"

    async def CreateUser(self, request: pb.CreateUserRequest, context: Context) -> pb.User:
        user = await self._store.create_user(
            name=request.name,
            email=request.email,
            admin=request.admin,
            limits=limits_to_dict(request.limits),
            now=self._now(),
        )
        return user_message(user)

    async def ListUsers(self, request: pb.ListUsersRequest, context: Context) -> pb.ListUsersResponse:
        users = await self._store.list_users(
            limit=request.limit, after_id=request.after_user_id, query=request.query
        )
        return pb.ListUsersResponse(users=[user_message(user) for user in users])

    async def CreateKey(self, request: pb.CreateKeyRequest, context: Context) -> pb.CreateKeyResponse:
        if not request.user_id:
            raise InvalidRequest("user_id is required.", param="user_id")
        scope = scope_of(request)
        plaintext, public_id, secret = keys.generate()
        key = await self._store.create_key(
            user_id=request.user_id,
            public_id=public_id,
            secret_hash=keys.hash_secret(self._pepper, secret),
            scope=scope,
            now=self._now(),
        )
        return pb.CreateKeyResponse(key=key_message(key), api_key=plaintext)

    async def ListKeys(self, request: pb.ListKeysRequest, context: Context) -> pb.ListKeysResponse:
        found = await self._store.list_keys(
            user_id=request.user_id, limit=request.limit, after_id=request.after_key_id, query=request.query
        )
        return pb.ListKeysResponse(keys=[key_message(key) for key in found])

    async def RevokeKey(self, request: pb.RevokeKeyRequest, context: Context) -> pb.ApiKey:
        key = await self._store.revoke_key(request.key_id, now=self._now())
        await self._cache.invalidate(key.id)
        return key_message(key)

    async def UpdateKey(self, request: pb.UpdateKeyRequest, context: Context) -> pb.ApiKey:
        fields = frozenset(request.update_mask.paths)
        unknown = sorted(fields - UPDATABLE_KEY_FIELDS)
        if not fields or unknown:
            raise InvalidRequest(
                f"update_mask must name some of {sorted(UPDATABLE_KEY_FIELDS)} (got {unknown or 'nothing'}).",
                param="update_mask",
            )
        key = await self._store.update_key(
            request.key_id,
            scope=scope_of(request.key),
            fields=fields,
            enabled=request.key.enabled,
            now=self._now(),
        )
        await self._cache.invalidate(key.id)
        return key_message(key)

    async def RotateKey(self, request: pb.RotateKeyRequest, context: Context) -> pb.CreateKeyResponse:
        plaintext, public_id, secret = keys.generate()
        key = await self._store.rotate_key(
            request.key_id, public_id=public_id, secret_hash=keys.hash_secret(self._pepper, secret)
        )
        await self._cache.invalidate(key.id)
        return pb.CreateKeyResponse(key=key_message(key), api_key=plaintext)

    async def IssueAdminToken(self, request: pb.IssueAdminTokenRequest, context: Context) -> pb.AdminToken:
        principal, reason, _ = await self._resolve(request.api_key)
        parsed = keys.parse(request.api_key)
        if principal is None or parsed is None:
            raise AuthenticationError(_DENIALS.get(reason, "Incorrect API key provided."))
        _admin_key_usable(
            expires_at=principal.expires_at,
            allowed_cidrs=list(principal.allowed_cidrs),
            client_ip=request.client_ip,
            now=self._clock.time(),
        )
        if not principal.admin:
            raise PermissionDenied("Only keys of admin users can obtain admin tokens.")
        token, claims = self._tokens.issue(
            principal.user_id,
            key_id=principal.key_id,
            key_generation=keys.generation(parsed[0]),
            scopes=list(request.scopes),
            ttl_s=request.ttl_seconds,
            now=self._now(),
        )
        return pb.AdminToken(
            token=token, expires_at=claims.expires_at, scopes=claims.scopes, user_id=claims.user_id
        )

    async def VerifyAdminToken(
        self, request: pb.VerifyAdminTokenRequest, context: Context
    ) -> pb.AdminTokenClaims:
        """A valid signature is not enough: the token's key is read back (on the primary, no cache; the
        admin API is not a hot path) so that revoking, disabling or rotating it ends its tokens at once."""
        return await self.admin_claims(
            request.token, required_scope=request.required_scope, client_ip=request.client_ip
        )

    async def RevokeAdminToken(
        self, request: pb.RevokeAdminTokenRequest, context: Context
    ) -> pb.RevokeAdminTokenResponse:
        """Holding the token is the right to end it; its key's state does not matter (a token of a key
        revoked since is refused anyway, and ending it too is harmless)."""
        try:
            claims = self._tokens.verify(request.token, required_scope="", now=self._now())
        except AuthenticationError:
            return pb.RevokeAdminTokenResponse(revoked=False)
        await self._store.revoke_admin_token(claims.token_id, expires_at=claims.expires_at, now=self._now())
        return pb.RevokeAdminTokenResponse(revoked=True, expires_at=claims.expires_at)

    async def admin_claims(self, token: str, *, required_scope: str, client_ip: str) -> pb.AdminTokenClaims:
        """:meth:`VerifyAdminToken` for auth's own gRPC server, which takes admin tokens too."""
        claims = self._tokens.verify(token, required_scope=required_scope, now=self._now())
        found = await self._store.admin_token_state(claims.key_id, token_id=claims.token_id)
        credential, token_revoked = found if found is not None else (None, False)
        if token_revoked:
            raise AuthenticationError("The admin token was ended (signed out); request a new one.")
        if (
            credential is None
            or credential.user.id != claims.user_id
            or keys.generation(credential.key.public_id) != claims.key_generation
        ):
            raise AuthenticationError("The admin token's key was rotated or removed; request a new token.")
        if credential.key.revoked:
            raise AuthenticationError("The admin token's key has been revoked.")
        if not credential.key.enabled:
            raise AuthenticationError("The admin token's key is disabled.")
        _admin_key_usable(
            expires_at=credential.key.expires_at,
            allowed_cidrs=list(credential.key.allowed_cidrs),
            client_ip=client_ip,
            now=self._clock.time(),
        )
        if not credential.user.admin:
            raise PermissionDenied("The admin token's user is no longer an administrator.")
        return pb.AdminTokenClaims(
            user_id=claims.user_id, scopes=claims.scopes, expires_at=claims.expires_at, key_id=claims.key_id
        )


def _admin_key_usable(*, expires_at: int, allowed_cidrs: list[str], client_ip: str, now: float) -> None:
    """An admin key's expiry and address restriction. Unlike VerifyKey, an unknown caller address does
    not pass a CIDR list: the relay always sends it, so its absence means the restriction cannot hold."""
    if expires_at and now >= expires_at:
        raise AuthenticationError("This API key has expired.")
    if allowed_cidrs and not scopes.ip_allowed(allowed_cidrs, client_ip):
        raise PermissionDenied(f"This API key may not be used from {client_ip or 'an unknown address'}.")


def _outcome(reason: DenyReason.ValueType) -> str:
    return DenyReason.Name(reason).removeprefix("DENY_REASON_").lower()
