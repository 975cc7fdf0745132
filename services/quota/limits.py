"""Rate and concurrency limits: RPM, TPM and in-flight requests, per key and per user.

**Windows.** RPM and TPM are sliding windows of one-second buckets: a request counts from the second
it was admitted until 61 s later, so no 60-second span ever admits more than the limit (a burst of 200
against ``rpm=150`` admits exactly 150). Tokens are counted when the request is admitted, as its prompt
estimate plus its output cap (OpenAI's own rule); settling does not give unused tokens back.

**Concurrency.** A slot is a lease: the reservation id in the key's (and user's) lease set, expiring
with the reservation's TTL. Settle, release and expiry remove it; a relay or quota process that dies
mid-request cannot leak a slot for longer than the TTL.

**One atomic step.** Every check of a Reserve runs in one call (one Redis round trip in
:mod:`services.quota.redis_limits`): all windows and slots are checked first, and only when all pass
are they all taken, so a refusal takes nothing. A hold refused afterwards by the ledger (balance,
budget) gives its share back with :meth:`Limiter.rollback`.

**Where the state lives.** With ``RELAYGATE_REDIS_URL`` set, in Redis, shared by every quota replica;
otherwise (the embedded default, one quota process) in :class:`LocalLimiter`, with the same rules.
:class:`GuardedLimiter` applies the failure policy when Redis is unreachable: by default requests pass
unchecked (fail-open; logged once per outage and counted), or they are refused with 503. Balances and
budgets never depend on Redis.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from services.common.clock import Clock
from services.common.errors import ConcurrencyLimited, InvalidRequest, RateLimited, ServiceUnavailable
from services.common.telemetry import METRICS

__all__ = [
    "EMPTY_TICKET",
    "LEASE_KEY",
    "LEASE_USER",
    "NO_LIMITS",
    "WINDOW_S",
    "Counter",
    "GuardedLimiter",
    "Lease",
    "LimitRequest",
    "Limiter",
    "LimiterUnavailable",
    "Limits",
    "LocalLimiter",
    "Ticket",
    "Window",
    "lease_names",
]

log = logging.getLogger(__name__)

# Seconds of history a rate window covers; a bucket counts for WINDOW_S + 1 seconds (see above).
WINDOW_S = 60
# A slot frees when any in-flight request ends, which nobody can foresee; this is the hint given.
CONCURRENCY_RETRY_S = 1.0

# Bits of ``reservations.leases``.
LEASE_KEY, LEASE_USER = 1, 2

_MAX_LIMIT = 10**15


@dataclass(frozen=True, slots=True)
class Limits:
    """A key's or user's limits as auth stores them (``relaygate.common.v1.Limits``); 0 = no limit.

    Spending caps are not limits of this kind: they are quota's budgets (``services.quota.budgets``).
    """

    rpm: int = 0
    tpm: int = 0
    max_concurrency: int = 0

    def validate(self, param: str) -> None:
        for name in ("rpm", "tpm", "max_concurrency"):
            value: int = getattr(self, name)
            if not 0 <= value <= _MAX_LIMIT:
                raise InvalidRequest(
                    f"{param}.{name} must be between 0 and {_MAX_LIMIT} (got {value})",
                    param=f"{param}.{name}",
                )


NO_LIMITS = Limits()


@dataclass(frozen=True, slots=True)
class Counter:
    """One rate window to check and charge: ``name`` is the same on every replica."""

    name: str
    # requests | tokens
    kind: str
    limit: int
    cost: int
    label: str


@dataclass(frozen=True, slots=True)
class Lease:
    """One concurrency slot set: ``bit`` is its ``LEASE_*`` flag."""

    name: str
    bit: int
    limit: int
    label: str


@dataclass(frozen=True, slots=True)
class LimitRequest:
    reservation_id: str
    counters: tuple[Counter, ...]
    leases: tuple[Lease, ...]
    # Unix seconds when the slot lapses by itself: the reservation's expiry.
    lease_until: float

    @classmethod
    def build(
        cls,
        *,
        reservation_id: str,
        key_id: str,
        user_id: str,
        key_limits: Limits,
        user_limits: Limits,
        tokens: int,
        lease_until: float,
    ) -> LimitRequest:
        counters: list[Counter] = []
        leases: list[Lease] = []
        scopes = (("key", key_id, key_limits, LEASE_KEY), ("user", user_id, user_limits, LEASE_USER))
        for scope, scope_id, limits, bit in scopes:
            if not scope_id:
                continue
            if limits.rpm:
                counters.append(
                    Counter(
                        f"{scope}:{scope_id}:rpm",
                        "requests",
                        limits.rpm,
                        1,
                        f"the RPM limit of {scope} {scope_id}",
                    )
                )
            if limits.tpm:
                counters.append(
                    Counter(
                        f"{scope}:{scope_id}:tpm",
                        "tokens",
                        limits.tpm,
                        tokens,
                        f"the TPM limit of {scope} {scope_id}",
                    )
                )
            if limits.max_concurrency:
                leases.append(
                    Lease(
                        f"{scope}:{scope_id}",
                        bit,
                        limits.max_concurrency,
                        f"the concurrency limit of {scope} {scope_id}",
                    )
                )
        return cls(reservation_id, tuple(counters), tuple(leases), lease_until)

    @property
    def empty(self) -> bool:
        return not self.counters and not self.leases


def lease_names(key_id: str, user_id: str, bits: int) -> tuple[str, ...]:
    """The lease sets a reservation holds slots in, from its ``leases`` bits."""
    names: list[str] = []
    if bits & LEASE_KEY and key_id:
        names.append(f"key:{key_id}")
    if bits & LEASE_USER and user_id:
        names.append(f"user:{user_id}")
    return tuple(names)


@dataclass(frozen=True, slots=True)
class Window:
    """A rate window after a request, as the OpenAI ``x-ratelimit-*`` headers show it."""

    limit: int
    remaining: int
    # Seconds until the window is back to its full limit.
    reset_s: float


@dataclass(frozen=True, slots=True)
class Ticket:
    """What one :meth:`Limiter.acquire` took, so that a refusal further on can give it back."""

    reservation_id: str
    # The second whose bucket was charged.
    bucket: int
    charged: tuple[Counter, ...]
    # Slots this call added (a repeated Reserve finds its slot already there and adds none).
    leased: tuple[Lease, ...]
    # Every slot the reservation holds, taken now or before: ``LEASE_*`` bits.
    lease_bits: int
    requests: Window | None
    tokens: Window | None


EMPTY_TICKET = Ticket("", 0, (), (), 0, None, None)


class LimiterUnavailable(Exception):
    """The shared limit state (Redis) could not be reached."""


class Limiter(Protocol):
    async def acquire(self, request: LimitRequest) -> Ticket:
        """Check every window and slot of ``request`` and take them all, or raise :class:`RateLimited`
        / :class:`ConcurrencyLimited` (taking nothing)."""
        ...

    async def rollback(self, ticket: Ticket) -> None:
        """Give back what ``ticket`` took: the request was refused further on or was a repeat."""
        ...

    async def release(self, reservation_id: str, leases: Sequence[str]) -> None:
        """Free the reservation's slots in the named lease sets; idempotent."""
        ...

    async def maintain(self) -> None:
        """Periodic upkeep, called by the expiry sweeper."""
        ...


def rate_refusal(counter: Counter, used: int, retry_after: float | None) -> RateLimited:
    if retry_after is None:
        return RateLimited(
            f"request too large for {counter.label}: it needs {counter.cost} {counter.kind} and the limit "
            f"is {counter.limit} per minute",
            param=counter.kind,
        )
    return RateLimited(
        f"rate limit reached: {counter.label} is {counter.limit} {counter.kind} per minute, {used} used; "
        f"retry in {retry_after:.1f}s",
        param=counter.kind,
        retry_after=retry_after,
    )


def concurrency_refusal(lease: Lease, earliest_expiry_s: float) -> ConcurrencyLimited:
    retry_after = max(0.001, min(CONCURRENCY_RETRY_S, earliest_expiry_s))
    return ConcurrencyLimited(
        f"concurrency limit reached: {lease.label} allows {lease.limit} requests in flight",
        param="max_concurrency",
        retry_after=retry_after,
    )


def most_constrained(windows: Sequence[tuple[str, Window]], kind: str) -> Window | None:
    """The window of ``kind`` closest to its limit (the one a client must pace itself by)."""
    candidates = [window for k, window in windows if k == kind]
    return min(candidates, key=lambda w: (w.remaining, w.limit), default=None)


def retry_after(buckets: dict[int, int], excess: int, now: float) -> float:
    """Seconds until enough of the oldest buckets leave the window to free ``excess`` units."""
    freed = 0
    for second in sorted(buckets):
        freed += buckets[second]
        if freed >= excess:
            return max(0.001, second + WINDOW_S + 1 - now)
    return float(WINDOW_S + 1)


class LocalLimiter:
    """The limits of a single quota process, in memory (the embedded default without Redis)."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._counters: dict[str, dict[int, int]] = {}
        self._leases: dict[str, dict[str, float]] = {}

    async def acquire(self, request: LimitRequest) -> Ticket:
        if request.empty:
            return EMPTY_TICKET
        now = self._clock.time()
        second = int(now)
        windows: list[tuple[str, Window]] = []
        for counter in request.counters:
            buckets = self._window(counter.name, second)
            used = sum(buckets.values())
            if counter.cost > counter.limit:
                raise rate_refusal(counter, used, None)
            if used + counter.cost > counter.limit:
                raise rate_refusal(
                    counter, used, retry_after(buckets, used + counter.cost - counter.limit, now)
                )
            windows.append(
                (
                    counter.kind,
                    Window(counter.limit, counter.limit - used - counter.cost, second + WINDOW_S + 1 - now),
                )
            )
        added: list[Lease] = []
        for lease in request.leases:
            holders = self._holders(lease.name, now)
            if request.reservation_id in holders:
                continue
            if len(holders) >= lease.limit:
                raise concurrency_refusal(lease, min(holders.values()) - now)
            added.append(lease)
        for counter in request.counters:
            buckets = self._counters.setdefault(counter.name, {})
            buckets[second] = buckets.get(second, 0) + counter.cost
        for lease in added:
            self._leases.setdefault(lease.name, {})[request.reservation_id] = request.lease_until
        return Ticket(
            request.reservation_id,
            second,
            request.counters,
            tuple(added),
            sum(lease.bit for lease in request.leases),
            most_constrained(windows, "requests"),
            most_constrained(windows, "tokens"),
        )

    async def rollback(self, ticket: Ticket) -> None:
        for counter in ticket.charged:
            buckets = self._counters.get(counter.name, {})
            left = buckets.get(ticket.bucket, 0) - counter.cost
            if left > 0:
                buckets[ticket.bucket] = left
            else:
                buckets.pop(ticket.bucket, None)
        await self.release(ticket.reservation_id, [lease.name for lease in ticket.leased])

    async def release(self, reservation_id: str, leases: Sequence[str]) -> None:
        for name in leases:
            holders = self._leases.get(name)
            if holders is not None:
                holders.pop(reservation_id, None)
                if not holders:
                    del self._leases[name]

    async def maintain(self) -> None:
        """Forget windows and lease sets nobody has used for a while (memory stays bounded)."""
        now = self._clock.time()
        for name in list(self._counters):
            if not self._window(name, int(now)):
                del self._counters[name]
        for name in list(self._leases):
            if not self._holders(name, now):
                del self._leases[name]

    def _window(self, name: str, second: int) -> dict[int, int]:
        buckets = self._counters.get(name)
        if buckets is None:
            return {}
        for stale in [b for b in buckets if b < second - WINDOW_S]:
            del buckets[stale]
        return buckets

    def _holders(self, name: str, now: float) -> dict[str, float]:
        holders = self._leases.get(name)
        if holders is None:
            return {}
        for lapsed in [rid for rid, until in holders.items() if until <= now]:
            del holders[lapsed]
        return holders


class GuardedLimiter:
    """Applies the failure policy around a limiter whose state is remote (Redis).

    While the state is unreachable, requests either pass unchecked (``fail_open``) or are refused with
    :class:`ServiceUnavailable`; the first failure of an outage is logged, the recovery too, and every
    unchecked request is counted. After a failure the remote is left alone for ``retry_interval_s``, so
    an outage costs one timeout per interval rather than one per request. Slots that could not be
    freed during an outage are freed by :meth:`maintain` once the remote answers again (at the latest
    they lapse with the reservation's TTL).
    """

    def __init__(
        self,
        inner: Limiter,
        *,
        clock: Clock,
        fail_open: bool,
        retry_interval_s: float = 1.0,
        max_pending: int = 10_000,
    ) -> None:
        self._inner = inner
        self._clock = clock
        self._fail_open = fail_open
        self._retry_interval_s = retry_interval_s
        self._down_since: float | None = None
        self._next_try = 0.0
        self._pending: collections.deque[tuple[str, tuple[str, ...]]] = collections.deque(maxlen=max_pending)

    @property
    def degraded(self) -> bool:
        return self._down_since is not None

    async def acquire(self, request: LimitRequest) -> Ticket:
        if request.empty:
            return EMPTY_TICKET
        if self._down_since is not None and self._clock.monotonic() < self._next_try:
            return self._unchecked()
        try:
            ticket = await self._inner.acquire(request)
        except LimiterUnavailable as exc:
            self._failed(exc)
            return self._unchecked()
        self._recovered()
        return ticket

    async def rollback(self, ticket: Ticket) -> None:
        if not ticket.charged and not ticket.leased:
            return
        try:
            await self._inner.rollback(ticket)
        except LimiterUnavailable as exc:
            # The counters lapse within a minute on their own; slots would stay taken until the TTL.
            self._failed(exc)
            if ticket.leased:
                self._pending.append((ticket.reservation_id, tuple(lease.name for lease in ticket.leased)))

    async def release(self, reservation_id: str, leases: Sequence[str]) -> None:
        if not leases:
            return
        if self._down_since is not None and self._clock.monotonic() < self._next_try:
            self._pending.append((reservation_id, tuple(leases)))
            return
        try:
            await self._inner.release(reservation_id, leases)
        except LimiterUnavailable as exc:
            self._failed(exc)
            self._pending.append((reservation_id, tuple(leases)))

    async def maintain(self) -> None:
        """Free the slots whose release failed during an outage, now that the remote may answer."""
        await self._inner.maintain()
        while self._pending:
            reservation_id, leases = self._pending[0]
            try:
                await self._inner.release(reservation_id, leases)
            except LimiterUnavailable as exc:
                self._failed(exc)
                return
            self._pending.popleft()
            self._recovered()

    def _unchecked(self) -> Ticket:
        if not self._fail_open:
            METRICS.quota_limits_unchecked.labels(result="refused").inc()
            raise ServiceUnavailable(
                "rate and concurrency limits cannot be checked right now (Redis is unreachable); "
                "the request was refused (RELAYGATE_LIMITS_FAIL_OPEN=false)"
            )
        METRICS.quota_limits_unchecked.labels(result="admitted").inc()
        return EMPTY_TICKET

    def _failed(self, exc: LimiterUnavailable) -> None:
        self._next_try = self._clock.monotonic() + self._retry_interval_s
        if self._down_since is None:
            self._down_since = self._clock.monotonic()
            METRICS.quota_limits_degraded.set(1)
            policy = "admitted unchecked" if self._fail_open else "refused"
            log.warning(
                "rate/concurrency limit state unreachable: requests are %s until it returns; "
                "balances and budgets are still enforced",
                policy,
                extra={"error": str(exc)[:300]},
            )

    def _recovered(self) -> None:
        if self._down_since is None:
            return
        outage_s = self._clock.monotonic() - self._down_since
        self._down_since = None
        METRICS.quota_limits_degraded.set(0)
        log.info("rate/concurrency limit state reachable again", extra={"outage_s": round(outage_s, 3)})
