"""Tables owned by auth: users and API keys. Keys are stored as keyed hashes, never in plaintext."""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Boolean, ForeignKey, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from services.common.db import Base


class User(Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    email: Mapped[str | None] = mapped_column(String(320), unique=True)
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    # Limits applied to every key of the user: {"rpm", "tpm", "max_concurrency"}; absent = none.
    # Budgets are quota's (``budgets``), not limits stored here.
    limits: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[int]


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    # The public part of "rg-<public_id>-<secret>", used to find the row.
    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    # HMAC-SHA256(pepper, secret).
    secret_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    allowed_models: Mapped[list[str]] = mapped_column(JSON, default=list)
    allowed_cidrs: Mapped[list[str]] = mapped_column(JSON, default=list)
    expires_at: Mapped[int] = mapped_column(default=0)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    revoked_at: Mapped[int] = mapped_column(default=0)
    limits: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    key_metadata: Mapped[dict[str, str]] = mapped_column("metadata", JSON, default=dict)
    created_at: Mapped[int]
    last_used_at: Mapped[int] = mapped_column(default=0)


class AdminTokenRevocation(Base):
    """An admin token ended before its expiry (signed out). Kept until the token would have expired;
    admin tokens are otherwise not stored."""

    __tablename__ = "admin_token_revocations"

    # The token's ``jti`` claim.
    token_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    expires_at: Mapped[int] = mapped_column(index=True)
