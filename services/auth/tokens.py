"""Admin tokens: short-lived HS256 JWTs that authorize calls to the admin API.

An admin exchanges an API key of an admin user for a token carrying scopes (``admin:read``,
``admin:write``). Tokens are not stored, but each names the key it was exchanged for (its id and
:func:`~services.auth.keys.generation`), and the servicer checks that key's current state on every use:
revoking, disabling, expiring or rotating the key, or taking admin away from its user, ends its tokens at
once. One token alone is ended by revoking its id (``jti``; signing out of the console): the id is kept
until the token's expiry, and checked in the same read as the key. Verification here checks the
signature, expiry, issuer and scope.
"""

from __future__ import annotations

from dataclasses import dataclass

import jwt

from services.common.errors import AuthenticationError, InvalidRequest, PermissionDenied
from services.common.ids import new_id
from services.common.scopes import ADMIN_READ, ADMIN_WRITE

READ = ADMIN_READ
WRITE = ADMIN_WRITE
SCOPES = (READ, WRITE)
ISSUER = "relaygate-auth"
_ALGORITHM = "HS256"
# Private claims: the key id and its generation (changes on rotation).
_KEY_CLAIM = "key"
_GENERATION_CLAIM = "kgen"


@dataclass(frozen=True)
class Claims:
    user_id: str
    key_id: str
    key_generation: str
    scopes: tuple[str, ...]
    expires_at: int
    # The ``jti`` claim: what revoking this one token records.
    token_id: str


class TokenAuthority:
    def __init__(self, secret: str, *, default_ttl_s: int, max_ttl_s: int) -> None:
        if not secret:
            raise ValueError("admin tokens need a signing secret")
        self._secret = secret
        self._default_ttl_s = default_ttl_s
        self._max_ttl_s = max_ttl_s

    def issue(
        self, user_id: str, *, key_id: str, key_generation: str, scopes: list[str], ttl_s: int, now: int
    ) -> tuple[str, Claims]:
        unknown = sorted(set(scopes) - set(SCOPES))
        if unknown:
            raise InvalidRequest(f"Unknown scopes {unknown}; allowed: {list(SCOPES)}.", param="scopes")
        if ttl_s < 0:
            raise InvalidRequest("ttl_seconds must not be negative.", param="ttl_seconds")
        granted = tuple(sorted(set(scopes))) if scopes else SCOPES
        expires_at = now + min(ttl_s or self._default_ttl_s, self._max_ttl_s)
        payload = {
            "iss": ISSUER,
            "sub": user_id,
            _KEY_CLAIM: key_id,
            _GENERATION_CLAIM: key_generation,
            "scope": " ".join(granted),
            "iat": now,
            "exp": expires_at,
            "jti": new_id("tok"),
        }
        token = jwt.encode(payload, self._secret, algorithm=_ALGORITHM)
        return token, Claims(user_id, key_id, key_generation, granted, expires_at, str(payload["jti"]))

    def verify(self, token: str, *, required_scope: str, now: int) -> Claims:
        """The claims; AuthenticationError if invalid or expired, PermissionDenied if the scope is missing."""
        try:
            payload = jwt.decode(
                token,
                self._secret,
                algorithms=[_ALGORITHM],
                issuer=ISSUER,
                options={
                    "require": ["exp", "iat", "sub", "iss", "jti", _KEY_CLAIM, _GENERATION_CLAIM],
                    "verify_iat": False,
                },
                leeway=0,
            )
        except jwt.ExpiredSignatureError:
            raise AuthenticationError("The admin token has expired; request a new one.") from None
        except jwt.PyJWTError:
            raise AuthenticationError("The admin token is not valid.") from None
        if int(payload["exp"]) <= now:
            raise AuthenticationError("The admin token has expired; request a new one.")
        scopes = tuple(str(payload.get("scope", "")).split())
        if required_scope and required_scope not in scopes:
            raise PermissionDenied(f"The admin token lacks the {required_scope!r} scope.")
        return Claims(
            user_id=str(payload["sub"]),
            key_id=str(payload[_KEY_CLAIM]),
            key_generation=str(payload[_GENERATION_CLAIM]),
            scopes=scopes,
            expires_at=int(payload["exp"]),
            token_id=str(payload["jti"]),
        )
