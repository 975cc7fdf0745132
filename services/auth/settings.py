"""Auth settings: where it listens, the key pepper, the principal cache and the first admin key."""

from __future__ import annotations

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.auth.keys import parse
from services.common.config import (
    BaseServiceSettings,
    DatabaseSettings,
    GrpcSecuritySettings,
    GrpcServerSettings,
    RedisSettings,
    check_secrets,
)


class AuthSettings(
    BaseServiceSettings, DatabaseSettings, RedisSettings, GrpcServerSettings, GrpcSecuritySettings
):
    # Validation errors must never echo the pepper or the bootstrap key back into logs.
    model_config = SettingsConfigDict(
        env_prefix="RELAYGATE_", extra="ignore", frozen=True, hide_input_in_errors=True
    )

    auth_listen: str = "127.0.0.1:50051"
    # HMAC key of the stored key hashes. Changing it invalidates every issued key. No default: a value
    # anyone can read would let them rebuild hashes; auth refuses to start without one.
    key_pepper: str = Field(default="", repr=False)
    # A full "rg-..." key; when set, startup ensures an admin user owns exactly this key.
    bootstrap_admin_key: str = Field(default="", repr=False)
    # How long a verified principal is served from the cache (revocations invalidate it at once).
    cache_ttl_s: float = Field(default=60.0, gt=0, le=86_400)
    # HMAC key signing admin tokens (JWT, HS256). No default, for the same reason: a known value would
    # let anyone mint admin tokens.
    admin_token_secret: str = Field(default="", repr=False)
    admin_token_ttl_s: int = Field(default=900, ge=30, le=86_400)
    admin_token_max_ttl_s: int = Field(default=3_600, ge=30, le=7 * 86_400)
    # How often batched last-used times are written.
    last_used_flush_s: float = Field(default=30.0, gt=0, le=3_600)

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> AuthSettings:
        check_secrets(
            self.environment, key_pepper=self.key_pepper, admin_token_secret=self.admin_token_secret
        )
        if self.key_pepper == self.admin_token_secret:
            # One leaked value must not give away both the key hashes and the token signatures.
            raise ValueError("RELAYGATE_KEY_PEPPER and RELAYGATE_ADMIN_TOKEN_SECRET must differ")
        if self.admin_token_ttl_s > self.admin_token_max_ttl_s:
            raise ValueError("RELAYGATE_ADMIN_TOKEN_TTL_S must not exceed RELAYGATE_ADMIN_TOKEN_MAX_TTL_S")
        if self.bootstrap_admin_key and parse(self.bootstrap_admin_key) is None:
            # The value itself is never part of the message.
            raise ValueError(
                "RELAYGATE_BOOTSTRAP_ADMIN_KEY must be a full key: rg-<12 letters/digits>-<32 letters/digits>"
            )
        return self
