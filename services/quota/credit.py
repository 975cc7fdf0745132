"""Quota's credit books: leases and reservations as holds on balances and budget windows, and the
usage events that charge them, decided in memory.

One object holds the rows a transaction touches (accounts, budget windows, holds, posted charges); each
operation changes them the way one transaction on the primary would, and the service writes the result
back. The deterministic simulation (``tests/credit_sim``) runs the same object as its database, so every
rule below is exercised against crashes, delays, duplicates and replays, with the invariants checked
after every step (:meth:`CreditBooks.problems`).

The rules:

- A hold's amount is ``granted - applied``. An account's ``held`` is the sum of its holds' amounts and
  never exceeds its balance; a window's ``spent + held`` never exceeds its cap. Every change to a hold's
  size goes through :meth:`CreditBooks._resize`, which moves the account and its windows with it.
- A lease's scope is one key (its windows and its user's) or a user (the user's windows only, shared by
  every key of the user without a budget of its own; its hold has an empty key id). A user-scope ask
  from a key that does have windows of its own is answered ``rescope``: that key asks a lease of its
  own, so a budget of a key is never bypassed through its user's shared lease.
- A lease grows only while its relay keeps syncing and only from the user's *share* (what is available
  over every window, divided over the user's open leases plus one, and halved again), so one relay never
  takes all of a balance. A grant below ``floor_requests`` worst cases is refused: that key stays on
  exact reservations, which cannot strand units.
- A charge (one usage event, idempotent by request id) first consumes its hold. Only a charge that
  arrives after its hold was given back (a relay that vanished, a spool replayed hours later) is taken
  from what is free, and what even that cannot cover is *written off*, recorded next to the cost: the
  balance never goes below what is held and never below zero, and the cost is still on the books.
- Closing a lease (relay says so, idle, recalled) shrinks it to what its relay reported used plus in
  flight; it closes for good once nothing is in flight and every reported use has been charged.
- A lease whose relay stops syncing expires ``grace_ms`` after its validity: what was reported used
  stays held for ``horizon_ms`` (its events may still come), the rest is released, never charged. A
  reservation that expires is released whole. What an unreported in-flight request of a dead relay
  costs is therefore nothing to the caller; the operator's exposure is that relay's in-flight worst cases.
- A reservation that cannot be covered while leases of the same user hold unused credit recalls those
  leases and answers ``retry``: the asker waits about a sync, and the last units of a balance go to
  whichever request is next, whichever relay holds it. Only when their unused parts would make room on
  the account and on every window the reservation lacks room on (a lease frees its own key's windows
  only), and only the leases that do: otherwise the refusal stands at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from services.common.credit import (
    LEASE,
    RESCOPE,
    RESERVATION,
    USER_SCOPE,
    Charge,
    CreditTerms,
    Grant,
    LeaseAsk,
    LeaseReport,
    ReserveAnswer,
    ReserveAsk,
    SyncAnswer,
    SyncRequest,
)

__all__ = [
    "CLOSED",
    "CLOSING",
    "EXPIRED",
    "OPEN",
    "Account",
    "CreditBooks",
    "Hold",
    "Posted",
    "Window",
    "WindowsOf",
]

# Hold states. A lease goes open -> closing -> closed, or open/closing -> expired -> closed; a
# reservation goes open -> closed.
OPEN = "open"
CLOSING = "closing"
EXPIRED = "expired"
CLOSED = "closed"
_ACTIVE = (OPEN, CLOSING, EXPIRED)

# The budget windows a key's holds count against: (key id, user id) -> window ids; with an empty key
# id, the user's own windows (what a user-scope lease holds against).
WindowsOf = Callable[[str, str], tuple[str, ...]]


@dataclass(slots=True)
class Account:
    balance: int
    held: int = 0

    @property
    def available(self) -> int:
        return self.balance - self.held


@dataclass(slots=True)
class Window:
    cap: int
    spent: int = 0
    held: int = 0

    @property
    def room(self) -> int:
        return self.cap - self.spent - self.held


@dataclass(slots=True)
class Hold:
    hold_id: str
    kind: str
    # Empty for a user-scope lease (any key of the user without a budget of its own charges it).
    key_id: str
    user_id: str
    windows: tuple[str, ...]
    expires_at: int
    relay_id: str = ""
    state: str = OPEN
    granted: int = 0
    # Charged against the hold (never more than granted).
    applied: int = 0
    # Charged beyond the hold, from what was free, after the hold was given back.
    over: int = 0
    # The relay's last report (leases only) and the sync it came in.
    used_reported: int = 0
    inflight_reported: int = 0
    seq: int = -1
    recall: bool = False
    # Given up by quota (its relay stopped syncing), as opposed to closed by its relay.
    expired: bool = False

    @property
    def amount(self) -> int:
        return self.granted - self.applied if self.state in _ACTIVE else 0


@dataclass(frozen=True, slots=True)
class Posted:
    """A charge on the books: ``charged + written_off == cost``."""

    request_id: str
    hold_id: str
    user_id: str
    cost: int
    charged: int
    written_off: int
    # Taken from what was free because the hold no longer covered it.
    beyond_hold: int
    # The hold had expired (or was unknown) when the charge arrived. Only a late charge may go beyond
    # its hold or be written off: anything else means a relay admitted more than it was granted.
    late: bool


@dataclass
class CreditBooks:
    terms: CreditTerms
    windows_of: WindowsOf
    accounts: dict[str, Account] = field(default_factory=dict)
    windows: dict[str, Window] = field(default_factory=dict)
    holds: dict[str, Hold] = field(default_factory=dict)
    posted: dict[str, Posted] = field(default_factory=dict)
    # What each user was charged in all (the ledger's sum, kept as charges are posted).
    charged: dict[str, int] = field(default_factory=dict)
    _active: set[str] = field(default_factory=set)
    _unchecked: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Books built from stored rows (the services load each transaction's holds) must know which
        # of them are active, or expiry, shares and recalls would not see them.
        self._active.update(hold_id for hold_id, hold in self.holds.items() if hold.state in _ACTIVE)

    # --- money in ------------------------------------------------------------------------------

    def top_up(self, user_id: str, amount: int) -> Account:
        account = self._account(user_id)
        if account.balance + amount < account.held:
            raise ValueError("a negative top-up may not take the balance below what is held")
        account.balance += amount
        return account

    def set_cap(self, window_id: str, cap: int) -> None:
        self.windows.setdefault(window_id, Window(cap=cap)).cap = cap

    # --- the relay's sync ----------------------------------------------------------------------

    def sync(self, request: SyncRequest, now: int) -> SyncAnswer:
        grants = [self._report(request, report, now) for report in request.reports]
        grants += [self._ask(request, ask, now) for ask in request.asks]
        return SyncAnswer(grants=tuple(grants))

    def _report(self, request: SyncRequest, report: LeaseReport, now: int) -> Grant:
        hold = self.holds.get(report.lease_id)
        if hold is None or hold.kind != LEASE or hold.relay_id != request.relay_id or hold.state == CLOSED:
            return Grant(report.lease_id, CLOSED)
        if hold.state == EXPIRED:
            # The relay was given up for dead; whatever it still finishes arrives as late charges.
            hold.used_reported = max(hold.used_reported, report.used_micros)
            return Grant(hold.hold_id, CLOSED)
        if request.seq <= hold.seq:
            return self._grant_of(hold)
        hold.seq = request.seq
        hold.used_reported = max(hold.used_reported, report.used_micros)
        hold.inflight_reported = report.inflight_micros
        hold.expires_at = now + self.terms.valid_for_ms + self.terms.grace_ms
        if report.closing or hold.state == CLOSING:
            hold.state = CLOSING
            self._resize(
                hold, max(hold.applied, min(hold.granted, hold.used_reported + hold.inflight_reported))
            )
            self._close_if_done(hold)
            return self._grant_of(hold)
        if report.want_micros > 0 and not hold.recall:
            extra = min(report.want_micros, self._share(hold.user_id, hold.windows))
            if extra > 0:
                self._resize(hold, hold.granted + extra)
        return self._grant_of(hold)

    def _ask(self, request: SyncRequest, ask: LeaseAsk, now: int) -> Grant:
        known = self.holds.get(ask.lease_id)
        if known is not None:
            return (
                self._grant_of(known) if known.relay_id == request.relay_id else Grant(ask.lease_id, CLOSED)
            )
        if ask.min_micros <= 0 or ask.want_micros < ask.min_micros:
            return Grant(ask.lease_id, "refused")
        key_id = ask.key_id
        windows = self.windows_of(key_id, ask.user_id)
        if ask.scope == USER_SCOPE:
            shared = self.windows_of("", ask.user_id)
            if set(windows) != set(shared):
                return Grant(ask.lease_id, RESCOPE)
            key_id, windows = "", shared
        if self._recalling(ask.user_id):
            return Grant(ask.lease_id, "refused")
        size = min(ask.want_micros, self._share(ask.user_id, windows))
        if size < ask.min_micros * self.terms.floor_requests:
            return Grant(ask.lease_id, "refused")
        hold = Hold(
            hold_id=ask.lease_id,
            kind=LEASE,
            key_id=key_id,
            user_id=ask.user_id,
            windows=windows,
            relay_id=request.relay_id,
            expires_at=now + self.terms.valid_for_ms + self.terms.grace_ms,
            seq=request.seq,
        )
        self._open(hold, size)
        return self._grant_of(hold)

    def _grant_of(self, hold: Hold) -> Grant:
        if hold.state == OPEN:
            return Grant(hold.hold_id, OPEN, hold.granted, self.terms.valid_for_ms, recall=hold.recall)
        if hold.state == CLOSING:
            return Grant(hold.hold_id, CLOSING, hold.granted, self.terms.valid_for_ms)
        return Grant(hold.hold_id, CLOSED)

    # --- the exact path --------------------------------------------------------------------------

    def reserve(self, ask: ReserveAsk, now: int) -> ReserveAnswer:
        known = self.holds.get(ask.hold_id)
        if known is not None:
            return ReserveAnswer(ask.hold_id, "held", self._account(ask.user_id).available)
        if ask.amount_micros < 0:
            raise ValueError("a reservation cannot be negative")
        windows = self.windows_of(ask.key_id, ask.user_id)
        room = self._room(ask.user_id, windows)
        if room >= ask.amount_micros:
            hold = Hold(
                hold_id=ask.hold_id,
                kind=RESERVATION,
                key_id=ask.key_id,
                user_id=ask.user_id,
                windows=windows,
                expires_at=now + self.terms.reservation_ttl_ms,
            )
            self._open(hold, ask.amount_micros)
            return ReserveAnswer(ask.hold_id, "held", self._account(ask.user_id).available)
        recalled = self._recallable(ask.user_id, windows, ask.amount_micros)
        if recalled:
            for hold in recalled:
                hold.recall = True
            return ReserveAnswer(ask.hold_id, "retry", room, retry_after_ms=2 * self.terms.sync_interval_ms)
        return ReserveAnswer(ask.hold_id, "refused", room)

    def _recallable(self, user_id: str, windows: tuple[str, ...], amount: int) -> list[Hold]:
        """The user's open leases whose unused parts, given back, would make room for ``amount`` on
        the account and on every one of ``windows``; none when even that would not.

        A lease gives back to the account and to its own key's windows only: a key whose daily
        budget is spent gains nothing from another key's lease, so that lease is not recalled for it
        (and a reserve that no recall can help is refused at once instead of told to wait).
        """
        leases = [hold for hold in self._leases_of(user_id) if _unused(hold) > 0]
        limits: list[tuple[str | None, int]] = [(None, self._account(user_id).available)]
        limits += [(window_id, self.windows[window_id].room) for window_id in windows]
        helping: set[str] = set()
        for window_id, room in limits:
            if room >= amount:
                continue
            freeing = [hold for hold in leases if window_id is None or window_id in hold.windows]
            if room + sum(_unused(hold) for hold in freeing) < amount:
                return []
            helping.update(hold.hold_id for hold in freeing)
        return [hold for hold in leases if hold.hold_id in helping]

    # --- charges from the usage stream -----------------------------------------------------------

    def charge(self, charge: Charge) -> Posted:
        """Apply one usage event; a repeat (same request id) changes nothing and returns the first."""
        if (known := self.posted.get(charge.request_id)) is not None:
            return known
        if charge.cost_micros < 0:
            raise ValueError("a cost cannot be negative")
        hold = self.holds.get(charge.hold_id)
        user_id = hold.user_id if hold is not None else charge.user_id
        windows = hold.windows if hold is not None else ()
        late = hold is None or hold.expired
        covered = min(charge.cost_micros, hold.amount) if hold is not None else 0
        extra = min(charge.cost_micros - covered, max(0, self._room(user_id, windows)))
        account = self._account(user_id)
        account.balance -= covered + extra
        account.held -= covered
        for window_id in windows:
            window = self.windows[window_id]
            window.spent += covered + extra
            window.held -= covered
        posted = Posted(
            request_id=charge.request_id,
            hold_id=charge.hold_id,
            user_id=user_id,
            cost=charge.cost_micros,
            charged=covered + extra,
            written_off=charge.cost_micros - covered - extra,
            beyond_hold=extra,
            late=late,
        )
        self.posted[charge.request_id] = posted
        self._unchecked.append(charge.request_id)
        self.charged[user_id] = self.charged.get(user_id, 0) + posted.charged
        if hold is not None:
            hold.applied += covered
            hold.over += extra
            if hold.kind == RESERVATION and hold.state == OPEN:
                self._resize(hold, hold.applied)
                self._set_state(hold, CLOSED)
            else:
                self._close_if_done(hold)
        return posted

    # --- expiry ----------------------------------------------------------------------------------

    def expire(self, now: int) -> list[Hold]:
        """Close what is due; returns the holds that changed."""
        changed: list[Hold] = []
        for hold_id in sorted(self._active):
            hold = self.holds[hold_id]
            if hold.expires_at > now:
                continue
            changed.append(hold)
            hold.expired = True
            if hold.kind == RESERVATION or hold.state == EXPIRED:
                self._resize(hold, hold.applied)
                self._set_state(hold, CLOSED)
                continue
            self._resize(hold, max(hold.applied, min(hold.granted, hold.used_reported)))
            self._set_state(hold, EXPIRED)
            hold.expires_at = now + self.terms.horizon_ms
            self._close_if_done(hold)
        return changed

    # --- checks ----------------------------------------------------------------------------------

    def problems(self) -> list[str]:
        """Every broken invariant of the books; empty when they agree.

        Cheap enough to run after every operation: it walks the active holds, the accounts and windows,
        and only the charges posted since the previous call.
        """
        found: list[str] = []
        held_by_user: dict[str, int] = {}
        held_by_window: dict[str, int] = {}
        for hold in self.active_holds():
            if not 0 <= hold.applied <= hold.granted:
                found.append(f"hold {hold.hold_id}: applied {hold.applied} outside 0..{hold.granted}")
            if hold.state not in _ACTIVE:
                found.append(f"hold {hold.hold_id}: indexed as active in state {hold.state}")
            held_by_user[hold.user_id] = held_by_user.get(hold.user_id, 0) + hold.amount
            for window_id in hold.windows:
                held_by_window[window_id] = held_by_window.get(window_id, 0) + hold.amount
        for user_id, account in self.accounts.items():
            if not 0 <= account.held <= account.balance:
                found.append(f"account {user_id}: held {account.held} outside 0..{account.balance}")
            if account.held != held_by_user.get(user_id, 0):
                found.append(
                    f"account {user_id}: held {account.held} != holds {held_by_user.get(user_id, 0)}"
                )
        for window_id, window in self.windows.items():
            if window.held < 0 or window.spent < 0 or window.spent + window.held > window.cap:
                found.append(
                    f"window {window_id}: spent {window.spent} + held {window.held} > cap {window.cap}"
                )
            if window.held != held_by_window.get(window_id, 0):
                found.append(
                    f"window {window_id}: held {window.held} != holds {held_by_window.get(window_id, 0)}"
                )
        for request_id in self._unchecked:
            posted = self.posted[request_id]
            if (
                posted.charged < 0
                or posted.written_off < 0
                or posted.charged + posted.written_off != posted.cost
            ):
                found.append(f"charge {request_id}: {posted.charged} + {posted.written_off} != {posted.cost}")
            if (posted.written_off or posted.beyond_hold) and not posted.late:
                found.append(f"charge {request_id}: beyond a hold that was never given up ({posted.hold_id})")
        self._unchecked.clear()
        return found

    def active_holds(self) -> Iterable[Hold]:
        return (self.holds[hold_id] for hold_id in sorted(self._active))

    # --- internals -------------------------------------------------------------------------------

    def _account(self, user_id: str) -> Account:
        return self.accounts.setdefault(user_id, Account(balance=0))

    def _room(self, user_id: str, windows: tuple[str, ...]) -> int:
        room = self._account(user_id).available
        for window_id in windows:
            room = min(room, self.windows[window_id].room)
        return room

    def _leases_of(self, user_id: str) -> list[Hold]:
        return [
            hold
            for hold in self.active_holds()
            if hold.kind == LEASE and hold.user_id == user_id and hold.state == OPEN
        ]

    def _share(self, user_id: str, windows: tuple[str, ...]) -> int:
        room = self._room(user_id, windows)
        if room <= 0:
            return 0
        return room // (self.terms.share_divisor * (len(self._leases_of(user_id)) + 1))

    def _recalling(self, user_id: str) -> bool:
        return any(hold.recall for hold in self._leases_of(user_id))

    def _open(self, hold: Hold, amount: int) -> None:
        self.holds[hold.hold_id] = hold
        self._active.add(hold.hold_id)
        self._resize(hold, amount)

    def _resize(self, hold: Hold, granted: int) -> None:
        if granted < hold.applied:
            raise AssertionError(f"hold {hold.hold_id} cannot shrink below what was charged")
        delta = granted - hold.granted
        hold.granted = granted
        if delta == 0 or hold.state not in _ACTIVE:
            return
        self._account(hold.user_id).held += delta
        for window_id in hold.windows:
            self.windows[window_id].held += delta

    def _set_state(self, hold: Hold, state: str) -> None:
        hold.state = state
        if state in _ACTIVE:
            self._active.add(hold.hold_id)
        else:
            self._active.discard(hold.hold_id)

    def _close_if_done(self, hold: Hold) -> None:
        """A closing or expired lease with nothing in flight closes once its reported use is charged."""
        if hold.kind != LEASE or hold.state not in (CLOSING, EXPIRED):
            return
        if hold.state == CLOSING and hold.inflight_reported > 0:
            return
        if hold.applied >= hold.used_reported:
            self._resize(hold, hold.applied)
            self._set_state(hold, CLOSED)


def _unused(hold: Hold) -> int:
    return max(0, hold.granted - hold.used_reported - hold.inflight_reported)
