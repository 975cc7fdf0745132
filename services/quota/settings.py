"""Quota settings: where it listens, how long holds live, how limits behave without Redis, and how
money edge cases are decided."""

from __future__ import annotations

from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator, model_validator

from services.common.config import (
    BaseServiceSettings,
    CreditSettings,
    DatabaseSettings,
    GrpcSecuritySettings,
    GrpcServerSettings,
    RedisSettings,
    ServiceAddresses,
)
from services.quota.settling import SettlingSettings


class QuotaSettings(
    BaseServiceSettings,
    DatabaseSettings,
    RedisSettings,
    GrpcServerSettings,
    CreditSettings,
    SettlingSettings,
    # Admin tokens presented to quota are checked by auth, at RELAYGATE_AUTH_ADDR.
    GrpcSecuritySettings,
    ServiceAddresses,
):
    quota_listen: str = "127.0.0.1:50052"
    # A hold nobody settles (the relay died mid-request) is released after this long, charging
    # nothing (flagged ``expired``). Keep it above the longest request a relay allows (its total
    # upstream timeout) plus its settle retries, or long streams go unbilled.
    reservation_ttl_s: int = Field(default=900, ge=1, le=7 * 24 * 3600)
    expiry_sweep_interval_s: float = Field(default=5.0, gt=0, le=3600)
    # Reservations expired per batch by the sweeper (one transaction each).
    expiry_batch_size: int = Field(default=100, ge=1, le=10_000)
    # When a request costs more than its hold: charge the excess (bounded by the balance) instead of
    # capping the charge at the hold.
    allow_overage: bool = False
    # Prices set through another quota process take effect here within this many seconds.
    price_cache_ttl_s: float = Field(default=2.0, ge=0, le=3600)
    # When Redis (the RPM/TPM/concurrency state shared by all quota processes) is unreachable: true
    # admits requests without those checks (logged once per outage, counted), false refuses them
    # with 503. Balances and budgets live in the database and are enforced either way.
    limits_fail_open: bool = True
    # After a Redis failure, requests skip it for this long before it is tried again.
    limits_retry_interval_s: float = Field(default=1.0, gt=0, le=60)
    # Day and month budget windows start at midnight / on the 1st in this IANA time zone.
    budget_timezone: str = "UTC"
    # Group commit: concurrent reserves (and settles) share a transaction of at most this many,
    # with at most ledger_batch_concurrency such transactions in flight per process. More than one
    # in flight mostly makes batches wait on each other's row locks (measured: 1 is fastest).
    ledger_batch_max: int = Field(default=64, ge=1, le=1000)
    ledger_batch_concurrency: int = Field(default=1, ge=1, le=64)
    # A balance read that must see an earlier write waits this long for a replica to replay it,
    # then reads the primary.
    replica_wait_s: float = Field(default=0.05, ge=0, le=5)

    @field_validator("budget_timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"RELAYGATE_BUDGET_TIMEZONE {value!r} is not an IANA time zone") from exc
        return value

    @model_validator(mode="after")
    def _sweep_within_ttl(self) -> QuotaSettings:
        if self.expiry_sweep_interval_s > self.reservation_ttl_s:
            raise ValueError(
                f"RELAYGATE_EXPIRY_SWEEP_INTERVAL_S ({self.expiry_sweep_interval_s}) must not exceed "
                f"RELAYGATE_RESERVATION_TTL_S ({self.reservation_ttl_s}): abandoned holds would outlive "
                "their TTL"
            )
        if self.environment == "prod" and self.reservation_ttl_s < 60:
            raise ValueError(
                "RELAYGATE_RESERVATION_TTL_S below 60 s would expire holds of requests still streaming; "
                "refused when environment=prod"
            )
        return self
