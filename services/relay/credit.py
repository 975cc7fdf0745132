"""The relay's lease book: admit requests against credit quota granted this process, without an RPC.

Per key the book holds at most one open lease. :meth:`LeaseBook.admit` takes a request's worst case out
of it when it covers it; otherwise the caller uses the exact path (one Reserve RPC for this request) and
the book asks quota for a lease at the next sync. :meth:`LeaseBook.finish` puts back what the request
did not use. Every ``sync_interval_ms`` (sooner when a lease runs low) the relay sends
:meth:`LeaseBook.sync_request` and applies quota's answer with :meth:`LeaseBook.apply`.

Safety does not depend on the sync getting through: a lease admits only until ``valid_for_ms -
margin_ms`` after the *sending* of the last sync quota answered, and quota keeps its hold until
``grace_ms`` after that validity, so a relay cut off from quota (or quota stopped) keeps serving its
leased keys for the validity and then falls back to the exact path, which fails cleanly while quota is
away. Times are milliseconds on the relay's own monotonic clock; nothing here does I/O, so the
simulation drives the very same object.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from services.common.credit import (
    CreditTerms,
    LeaseAsk,
    LeaseReport,
    SyncAnswer,
    SyncRequest,
)

__all__ = ["Admission", "LeaseBook", "LocalLease"]

PENDING = "pending"
OPEN = "open"
CLOSING = "closing"

# The spend rate is smoothed over about this long, so a burst asks for more and a quiet key asks less.
_RATE_WINDOW_MS = 5_000.0


@dataclass(slots=True)
class LocalLease:
    lease_id: str
    key_id: str
    user_id: str
    state: str = PENDING
    granted: int = 0
    used: int = 0
    inflight: int = 0
    # Admits until then (local clock); 0 while pending.
    expires_at: int = 0
    last_admit: int = 0
    # The worst case of the request that made the book ask (pending leases only).
    min_micros: int = 0

    @property
    def left(self) -> int:
        return self.granted - self.used - self.inflight


@dataclass(frozen=True, slots=True)
class Admission:
    """A request admitted on a lease; :meth:`LeaseBook.finish` it exactly once."""

    lease_id: str
    key_id: str
    user_id: str
    bound: int


@dataclass(slots=True)
class _Demand:
    """A key's recent demand: worst cases per millisecond, smoothed."""

    rate: float = 0.0
    at: int = 0

    def add(self, amount: int, now: int) -> None:
        elapsed = max(0, now - self.at)
        self.rate *= max(0.0, 1.0 - elapsed / _RATE_WINDOW_MS)
        self.rate += amount / _RATE_WINDOW_MS
        self.at = now

    def current(self, now: int) -> float:
        return self.rate * max(0.0, 1.0 - max(0, now - self.at) / _RATE_WINDOW_MS)


class LeaseBook:
    def __init__(self, relay_id: str, terms: CreditTerms, new_id: Callable[[], str]) -> None:
        self.relay_id = relay_id
        self.terms = terms
        self._new_id = new_id
        self._seq = 0
        # The lease each key admits on (open) or is waiting for (pending).
        self._by_key: dict[str, LocalLease] = {}
        # Every lease quota still knows of: the keys' current ones and closing ones.
        self._leases: dict[str, LocalLease] = {}
        self._demand: dict[str, _Demand] = {}
        # Keys quota would not lease, until when (local clock): they use the exact path.
        self._exact_until: dict[str, int] = {}
        self._last_sync = -(10**12)

    # --- requests --------------------------------------------------------------------------------

    def admit(self, key_id: str, user_id: str, bound: int, now: int) -> Admission | None:
        """Admit a request whose worst case is ``bound`` on the key's lease, or ``None`` (exact path)."""
        self._demand.setdefault(key_id, _Demand()).add(bound, now)
        lease = self._by_key.get(key_id)
        if lease is None:
            if now >= self._exact_until.get(key_id, 0):
                lease = LocalLease(self._new_id(), key_id, user_id, min_micros=bound)
                self._by_key[key_id] = lease
                self._leases[lease.lease_id] = lease
            return None
        if lease.state == PENDING:
            lease.min_micros = max(lease.min_micros, bound)
            return None
        if lease.state != OPEN or now >= lease.expires_at or lease.left < bound:
            return None
        lease.inflight += bound
        lease.last_admit = now
        return Admission(lease.lease_id, key_id, user_id, bound)

    def finish(self, admission: Admission, cost: int) -> int:
        """The request is over and cost ``cost`` (its usage event carries it); returns the cost, never
        more than the admitted worst case, because that is all the lease held for it."""
        charged = min(max(cost, 0), admission.bound)
        lease = self._leases.get(admission.lease_id)
        if lease is not None:
            lease.inflight -= admission.bound
            lease.used += charged
        return charged

    # --- sync with quota -------------------------------------------------------------------------

    def sync_due(self, now: int) -> bool:
        """A sync is due: the interval passed, a key waits for a lease, or an open lease runs low."""
        if now - self._last_sync >= self.terms.sync_interval_ms:
            return True
        if now - self._last_sync < self.terms.sync_interval_ms // 10:
            return False
        return any(lease.state == PENDING or self._low(lease, now) for lease in self._by_key.values())

    def sync_request(self, now: int) -> SyncRequest:
        self._last_sync = now
        self._seq += 1
        reports: list[LeaseReport] = []
        asks: list[LeaseAsk] = []
        for lease in list(self._leases.values()):
            if lease.state == PENDING:
                want = max(self._target(lease.key_id, now), lease.min_micros * self.terms.floor_requests)
                asks.append(LeaseAsk(lease.lease_id, lease.key_id, lease.user_id, want, lease.min_micros))
                continue
            if lease.state == OPEN and self._should_close(lease, now):
                self._close(lease)
            want = 0
            if lease.state == OPEN:
                want = max(0, self._target(lease.key_id, now) - lease.left)
            reports.append(
                LeaseReport(lease.lease_id, lease.used, lease.inflight, want, closing=lease.state == CLOSING)
            )
        return SyncRequest(self.relay_id, self._seq, tuple(reports), tuple(asks))

    def apply(self, answer: SyncAnswer, sent_at: int) -> None:
        """Quota's answer to the sync sent at ``sent_at`` (local clock)."""
        for grant in answer.grants:
            lease = self._leases.get(grant.lease_id)
            if lease is None:
                continue
            if grant.state in ("closed", "refused"):
                self._forget(lease)
                if grant.state == "refused" or lease.state == PENDING:
                    self._exact_until[lease.key_id] = sent_at + self.terms.exact_for_ms
                continue
            if grant.state == CLOSING:
                self._close(lease)
                continue
            if lease.state == PENDING:
                lease.state = OPEN
                lease.last_admit = sent_at
            if lease.state == OPEN:
                lease.granted = max(lease.granted, grant.granted_micros)
                valid_until = sent_at + grant.valid_for_ms - self.terms.margin_ms
                lease.expires_at = max(lease.expires_at, valid_until)
                if grant.recall:
                    self._close(lease)
                    self._exact_until[lease.key_id] = sent_at + self.terms.exact_for_ms

    def close_all(self) -> None:
        """Shutting down: admit nothing more; the next syncs give every lease back."""
        for lease in list(self._leases.values()):
            if lease.state == PENDING:
                self._forget(lease)
            else:
                self._close(lease)

    # --- views -----------------------------------------------------------------------------------

    def leases(self) -> list[LocalLease]:
        return list(self._leases.values())

    def lease(self, lease_id: str) -> LocalLease | None:
        return self._leases.get(lease_id)

    @property
    def idle(self) -> bool:
        """Nothing left to tell quota."""
        return not self._leases

    # --- internals -------------------------------------------------------------------------------

    def _target(self, key_id: str, now: int) -> int:
        demand = self._demand.get(key_id)
        return int(demand.current(now) * self.terms.target_ms) if demand is not None else 0

    def _low(self, lease: LocalLease, now: int) -> bool:
        return lease.state == OPEN and lease.left * 4 < self._target(lease.key_id, now)

    def _should_close(self, lease: LocalLease, now: int) -> bool:
        return now >= lease.expires_at or now - lease.last_admit >= self.terms.idle_ms

    def _close(self, lease: LocalLease) -> None:
        lease.state = CLOSING
        if self._by_key.get(lease.key_id) is lease:
            del self._by_key[lease.key_id]

    def _forget(self, lease: LocalLease) -> None:
        self._leases.pop(lease.lease_id, None)
        if self._by_key.get(lease.key_id) is lease:
            del self._by_key[lease.key_id]
