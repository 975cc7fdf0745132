"""The relay's lease book: admit requests against credit quota granted this process, without an RPC.

Per *scope* the book holds at most one open lease. A key with a budget of its own is its own scope; the
other keys of a user share the scope ``user:<user id>`` (they count against exactly the user's windows),
so one lease serves all of them and a key's first request is admitted without an RPC. Which keys have
budgets of their own is quota's list (:class:`~services.common.credit.BudgetedKeys`, refreshed by the
syncs); until the book has it, and when quota's list is incomplete, every key is its own scope.
:meth:`LeaseBook.admit` takes a request's worst case out of its scope's lease when it covers it;
otherwise the caller uses the exact path (one Reserve RPC for this request) and, when the scope's
requests say a lease would be used, the book asks quota for one at the next sync.
:meth:`LeaseBook.finish` puts back what the request did not use. Every ``sync_interval_ms`` (sooner,
see below) the relay sends :meth:`LeaseBook.sync_request` and applies quota's answer with
:meth:`LeaseBook.apply`.

Safety does not depend on the sync getting through: a lease admits only until ``valid_for_ms -
margin_ms`` after the *sending* of the last sync quota answered, and quota keeps its hold until
``grace_ms`` after that validity, so a relay cut off from quota (or quota stopped) keeps serving its
leased keys for the validity and then falls back to the exact path, which fails cleanly while quota is
away. Times are milliseconds on the relay's own monotonic clock; nothing here does I/O, so the
simulation drives the very same object.

**When a scope asks for a lease.** A lease costs quota a grant, a report in every sync while it lives
and a close (transactions on the primary), and the request that makes the book ask goes through the
exact path anyway. So the book asks only when a lease will be used: on a scope's request that comes
less than ``idle_ms`` after the scope's previous one, the same span after which an unused lease is given
back. Counted per scope, so a user's keys that each come once (rotating keys) ask on the user's rate:
the user's second request within ``idle_ms`` asks, whichever keys made them. A scope seen once every
20 s never asks (its requests stay exact); a scope quota refused stays exact for ``exact_for_ms``. A
user-scope ask that quota answers ``rescope`` (the asking key has a budget of its own, and the book's
list did not say so yet) moves that key to a scope of its own for ``valid_for_ms``, by when the list
says it.

**When a sync goes early.** Every ``sync_interval_ms``, and sooner (at most every tenth of an interval)
when quota should hear something now: a key waits for a lease, an admission left its lease low, a
lease turned closing (recalled by quota: its unused part is what a waiting exact reserve needs), or an
open lease reaches its validity or its idle time. Whether one is due is decided in constant time: the
book notes these events as they happen instead of scanning its leases at every poll.

**What it remembers.** Per scope, its recent demand (for ``idle_ms`` after its last request, longer
while it holds a lease) and a refusal (for ``exact_for_ms``); both are dropped at the first sync after,
so a relay serving many quiet keys keeps state only for the scopes seen lately: one per user for keys
without budgets of their own, however many of them rotate. Besides that, the budgeted keys' list (one
string per budgeted key in the deployment, at most ``MAX_BUDGETED_KEYS`` of quota's).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from services.common.credit import (
    KEY_SCOPE,
    RESCOPE,
    USER_SCOPE,
    BudgetedKeys,
    CreditTerms,
    LeaseAsk,
    LeaseReport,
    SyncAnswer,
    SyncRequest,
)

__all__ = ["Admission", "LeaseBook", "LeaseTurn", "LocalLease", "recall_wait_ms", "user_scope"]

PENDING = "pending"
OPEN = "open"
CLOSING = "closing"

# Why the book turned a lease (the ``reason`` passed to the book's ``on_turn``): granted, or why it
# stopped admitting on it (closing: reported to quota at the next sync) or forgot it.
GRANTED = "granted"
EXPIRED = "expired"  # its validity ran out before a sync quota answered renewed it
IDLE = "idle"  # no admission for idle_ms
RECALLED = "recalled"  # quota recalled it for an exact reserve of its user
QUOTA_CLOSING = "quota closing"  # quota answered it is closing
QUOTA_CLOSED = "quota closed"  # quota answered it is closed (the end of a closing lease, or given up)
REFUSED = "refused"  # quota would not grant the ask
RESCOPED = "rescoped"  # the asking key has a budget of its own
SHUTTING_DOWN = "shutting down"

# Told each turn of a lease with its reason; a lease turns a handful of times in its life, never per
# request.
LeaseTurn = Callable[["LocalLease", str], None]

# The spend rate is smoothed over about this long, so a burst asks for more and a quiet key asks less.
_RATE_WINDOW_MS = 5_000.0
_NEVER = 2**62


def user_scope(user_id: str) -> str:
    """The book's scope shared by a user's keys without budgets of their own (key ids never start so)."""
    return f"user:{user_id}"


def recall_wait_ms(terms: CreditTerms, sync_deadline_ms: int) -> int:
    """How long an exact reserve keeps retrying, from quota's first "retry", while quota recalls the
    user's leases for it: the longest a relay that is alive and reaching quota can take to give a
    recalled lease back, then one more of quota's retry-afters (two intervals).

    Each of the holding relay's syncs ends within ``sync_deadline_ms``, and it sends one at least
    every interval: the sync in flight when quota flagged the recall, then the one that carries it
    (the next at most ``max(interval, deadline)`` later), then the closing report, sent a tenth of an
    interval after (:meth:`LeaseBook.sync_due`), in whose transaction quota shrinks the lease. A relay
    slower than that is failing its syncs; its lease comes back only when it expires (``valid_for_ms
    + grace_ms`` after its last sync), longer than a caller should wait for an answer.
    """
    interval = terms.sync_interval_ms
    return max(interval, sync_deadline_ms) + 2 * sync_deadline_ms + interval // 10 + 2 * interval


@dataclass(slots=True)
class LocalLease:
    lease_id: str
    # The key id, or ``user_scope(user_id)`` for a lease the user's keys share.
    scope: str
    # The key whose request made the book ask (quota checks it may share a user-scope lease).
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

    @property
    def shared(self) -> bool:
        return self.scope != self.key_id


@dataclass(frozen=True, slots=True)
class Admission:
    """A request of ``key_id`` admitted on a lease (its own or its user's shared one);
    :meth:`LeaseBook.finish` it exactly once."""

    lease_id: str
    key_id: str
    user_id: str
    bound: int


@dataclass(slots=True)
class _Demand:
    """A scope's recent demand: worst cases per millisecond, smoothed."""

    rate: float = 0.0
    at: int = 0

    def add(self, amount: int, now: int) -> None:
        elapsed = max(0, now - self.at)
        self.rate *= max(0.0, 1.0 - elapsed / _RATE_WINDOW_MS)
        self.rate += amount / _RATE_WINDOW_MS
        self.at = now

    def current(self, now: int) -> float:
        return self.rate * max(0.0, 1.0 - max(0, now - self.at) / _RATE_WINDOW_MS)


def _unobserved(_lease: LocalLease, _reason: str) -> None:
    pass


class LeaseBook:
    def __init__(
        self,
        relay_id: str,
        terms: CreditTerms,
        new_id: Callable[[], str],
        on_turn: LeaseTurn = _unobserved,
    ) -> None:
        self.relay_id = relay_id
        self.terms = terms
        self._new_id = new_id
        self._on_turn = on_turn
        self._seq = 0
        # The lease each scope admits on (open) or is waiting for (pending).
        self._by_scope: dict[str, LocalLease] = {}
        # Every lease quota still knows of: the scopes' current ones and closing ones.
        self._leases: dict[str, LocalLease] = {}
        # Scopes seen lately (pruned at syncs, see the module docstring).
        self._demand: dict[str, _Demand] = {}
        # Scopes quota would not lease, until when (local clock): they use the exact path.
        self._exact_until: dict[str, int] = {}
        # Quota's list of keys with budgets of their own (None until the first answer carrying it).
        self._budgeted: BudgetedKeys | None = None
        # Keys quota answered ``rescope`` for, until when (local clock): their own scope meanwhile.
        self._own_scope_until: dict[str, int] = {}
        self._last_sync = -(10**12)
        # Quota should hear from the book before the interval is over (see sync_due).
        self._urgent = False
        # The earliest moment an open lease may close on its own (validity or idle time); a bound
        # noted at each sync, so it may come early but never late.
        self._next_close = _NEVER

    # --- requests --------------------------------------------------------------------------------

    def scope_of(self, key_id: str, user_id: str) -> str:
        """The scope whose lease admits ``key_id``'s requests: its user's shared one only when quota's
        list says the key has no budget of its own."""
        budgeted = self._budgeted
        if (
            budgeted is None
            or not budgeted.complete
            or key_id in budgeted.key_ids
            or key_id in self._own_scope_until
        ):
            return key_id
        return user_scope(user_id)

    def admit(self, key_id: str, user_id: str, bound: int, now: int) -> Admission | None:
        """Admit a request whose worst case is ``bound`` on its scope's lease, or ``None`` (exact path)."""
        scope = self.scope_of(key_id, user_id)
        demand = self._demand.get(scope)
        if demand is None:
            demand = self._demand[scope] = _Demand(at=now)
            seen_lately = False
        else:
            seen_lately = now - demand.at < self.terms.idle_ms
        demand.add(bound, now)
        lease = self._by_scope.get(scope)
        if lease is None:
            if seen_lately and now >= self._exact_until.get(scope, 0):
                lease = LocalLease(self._new_id(), scope, key_id, user_id, min_micros=bound)
                self._by_scope[scope] = lease
                self._leases[lease.lease_id] = lease
                self._urgent = True
            return None
        if lease.state == PENDING:
            lease.min_micros = max(lease.min_micros, bound)
            return None
        if lease.state != OPEN or now >= lease.expires_at or lease.left < bound:
            self._urgent = self._urgent or self._low(lease, now)
            return None
        lease.inflight += bound
        lease.last_admit = now
        self._urgent = self._urgent or self._low(lease, now)
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
        """A sync is due: the interval passed, or (a tenth of an interval after the last one) a scope
        waits for a lease, a lease runs low, turned closing, or reaches its validity or idle time."""
        if now - self._last_sync >= self.terms.sync_interval_ms:
            return True
        if now - self._last_sync < self.terms.sync_interval_ms // 10:
            return False
        return self._urgent or now >= self._next_close

    def sync_request(self, now: int) -> SyncRequest:
        self._last_sync = now
        self._seq += 1
        self._next_close = _NEVER
        reports: list[LeaseReport] = []
        asks: list[LeaseAsk] = []
        self._prune(now)
        for lease in list(self._leases.values()):
            if lease.state == PENDING:
                want = max(self._target(lease.scope, now), lease.min_micros * self.terms.floor_requests)
                scope = USER_SCOPE if lease.shared else KEY_SCOPE
                asks.append(
                    LeaseAsk(lease.lease_id, lease.key_id, lease.user_id, want, lease.min_micros, scope)
                )
                continue
            if lease.state == OPEN and (why := self._close_reason(lease, now)):
                self._close(lease, why)
            want = 0
            if lease.state == OPEN:
                want = max(0, self._target(lease.scope, now) - lease.left)
                self._note_close(lease)
            reports.append(
                LeaseReport(lease.lease_id, lease.used, lease.inflight, want, closing=lease.state == CLOSING)
            )
        # This sync tells quota everything noted so far, the leases it just closed included.
        self._urgent = False
        version = self._budgeted.version if self._budgeted is not None else ""
        return SyncRequest(self.relay_id, self._seq, tuple(reports), tuple(asks), version)

    def apply(self, answer: SyncAnswer, sent_at: int) -> None:
        """Quota's answer to the sync sent at ``sent_at`` (local clock)."""
        if answer.budgeted is not None:
            # A key the list now names leaves its user's shared lease at its next request.
            self._budgeted = answer.budgeted
        for grant in answer.grants:
            lease = self._leases.get(grant.lease_id)
            if lease is None:
                continue
            if grant.state == RESCOPE:
                self._forget(lease, RESCOPED)
                self._rescope(lease, sent_at)
                continue
            if grant.state in ("closed", "refused"):
                self._forget(lease, REFUSED if grant.state == "refused" else QUOTA_CLOSED)
                if grant.state == "refused" or lease.state == PENDING:
                    self._exact_until[lease.scope] = sent_at + self.terms.exact_for_ms
                continue
            if grant.state == CLOSING:
                if lease.state != CLOSING:
                    self._close(lease, QUOTA_CLOSING)
                continue
            opened = lease.state == PENDING
            if opened:
                lease.state = OPEN
                lease.last_admit = sent_at
            if lease.state == OPEN:
                lease.granted = max(lease.granted, grant.granted_micros)
                valid_until = sent_at + grant.valid_for_ms - self.terms.margin_ms
                lease.expires_at = max(lease.expires_at, valid_until)
                if opened:
                    self._on_turn(lease, GRANTED)
                if grant.recall:
                    self._close(lease, RECALLED)
                    self._exact_until[lease.scope] = sent_at + self.terms.exact_for_ms
                else:
                    self._note_close(lease)

    def close_all(self) -> None:
        """Shutting down: admit nothing more; the next syncs give every lease back."""
        for lease in list(self._leases.values()):
            if lease.state == PENDING:
                self._forget(lease, SHUTTING_DOWN)
            elif lease.state == OPEN:
                self._close(lease, SHUTTING_DOWN)
        # Closing ones included: the next sync gives back whatever quota still holds.
        self._urgent = self._urgent or bool(self._leases)

    # --- views -----------------------------------------------------------------------------------

    def leases(self) -> list[LocalLease]:
        return list(self._leases.values())

    def lease(self, lease_id: str) -> LocalLease | None:
        return self._leases.get(lease_id)

    def remembered(self) -> int:
        """How many scopes and keys the book keeps anything for besides their leases (recent demand,
        refusals, keys moved to their own scope)."""
        return len(self._demand.keys() | self._exact_until.keys() | self._own_scope_until.keys())

    @property
    def budgeted(self) -> BudgetedKeys | None:
        return self._budgeted

    @property
    def idle(self) -> bool:
        """Nothing left to tell quota."""
        return not self._leases

    # --- internals -------------------------------------------------------------------------------

    def _rescope(self, lease: LocalLease, sent_at: int) -> None:
        """The key that asked for its user's shared lease has a budget of its own: it is its own scope
        until quota's list says so, and asks for a lease of its own at its next request."""
        key_id = lease.key_id
        self._own_scope_until[key_id] = sent_at + self.terms.valid_for_ms
        demand = self._demand.get(lease.scope)
        if demand is not None and key_id not in self._demand:
            self._demand[key_id] = _Demand(demand.rate, demand.at)

    def _target(self, scope: str, now: int) -> int:
        demand = self._demand.get(scope)
        return int(demand.current(now) * self.terms.target_ms) if demand is not None else 0

    def _low(self, lease: LocalLease, now: int) -> bool:
        return lease.state == OPEN and lease.left * 4 < self._target(lease.scope, now)

    def _close_reason(self, lease: LocalLease, now: int) -> str:
        """Why an open lease closes on its own at ``now``; empty while it does not."""
        if now >= lease.expires_at:
            return EXPIRED
        if now - lease.last_admit >= self.terms.idle_ms:
            return IDLE
        return ""

    def _close(self, lease: LocalLease, reason: str) -> None:
        """Admit nothing more on ``lease``; the next sync (due at once) tells quota, which gives its
        unused part back to the user."""
        lease.state = CLOSING
        self._urgent = True
        if self._by_scope.get(lease.scope) is lease:
            del self._by_scope[lease.scope]
        self._on_turn(lease, reason)

    def _note_close(self, lease: LocalLease) -> None:
        self._next_close = min(self._next_close, lease.expires_at, lease.last_admit + self.terms.idle_ms)

    def _prune(self, now: int) -> None:
        """Forget scopes not seen for ``idle_ms`` (and the smoothing window) that hold no lease, and
        refusals and rescopes that ran out."""
        quiet_for = max(self.terms.idle_ms, int(_RATE_WINDOW_MS))
        for scope in [k for k, d in self._demand.items() if now - d.at >= quiet_for]:
            if scope not in self._by_scope:
                del self._demand[scope]
        for scope in [k for k, until in self._exact_until.items() if now >= until]:
            del self._exact_until[scope]
        for key_id in [k for k, until in self._own_scope_until.items() if now >= until]:
            del self._own_scope_until[key_id]

    def _forget(self, lease: LocalLease, reason: str) -> None:
        self._leases.pop(lease.lease_id, None)
        if self._by_scope.get(lease.scope) is lease:
            del self._by_scope[lease.scope]
        self._on_turn(lease, reason)
