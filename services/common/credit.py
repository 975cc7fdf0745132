"""The credit-control protocol between relays and quota: what a relay asks for, reports and is granted.

A *lease* is credit quota grants one relay process for one *scope*: a hold of ``granted`` micro-units on
the user's balance and on every budget window of the scope, recorded on the primary like any
reservation, so ``balance >= sum of holds`` holds at every commit whatever the relays do. The relay
admits requests locally while the lease covers their worst case (no RPC per request), and tells quota
what it used in one periodic *sync* per relay process (RFC 4006's granted and used units; Doorman's
refresh). Each finished request is also a usage event on the usage topic: that event *is* the charge,
applied by quota's consumer, idempotent by request id; the sync only says how much usage is on its way.

A lease's scope is the set of holds it takes. A key with a budget of its own counts against its own
windows and its user's, so it gets a lease of its own (``KEY_SCOPE``). Every other key of a user counts
against exactly the user's windows, so they all share one lease per relay process (``USER_SCOPE``): a
user's many quiet keys cost one lease, and a key's first request is admitted on it without an RPC.
Which keys have budgets of their own is quota's to say (its budget table): it refuses a user-scope ask
from such a key (``RESCOPE``), and every sync answer tells a relay whose list is out of date which keys
have them (:class:`BudgetedKeys`), so the relay keeps those keys off the shared lease.

A *reservation* is the same hold used once: the exact per-request path for keys whose balance is too
small to lease (the last units of a balance are never stranded in one relay), and the fallback while a
key has no lease. Its single usage event settles it and returns the rest.

These are the protocol's messages in plain form; the gRPC adapters translate them to and from
``relaygate.quota.v1``. The decisions live in ``services.quota.credit`` (quota's books) and
``services.relay.meter.credit`` (the relay's lease book), both pure, so the protocol is simulated
deterministically (``tests/credit_sim``) with the same code the services run.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "KEY_SCOPE",
    "LEASE",
    "RESCOPE",
    "RESERVATION",
    "USER_SCOPE",
    "BudgetedKeys",
    "Charge",
    "CreditTerms",
    "Grant",
    "LeaseAsk",
    "LeaseReport",
    "ReserveAnswer",
    "ReserveAsk",
    "SyncAnswer",
    "SyncRequest",
]

LEASE = "lease"
RESERVATION = "reservation"

# A lease's scope: one key's windows and its user's, or the user's windows only (shared by the user's
# keys without a budget of their own).
KEY_SCOPE = "key"
USER_SCOPE = "user"
# The grant state answering a user-scope ask from a key with a budget of its own.
RESCOPE = "rescope"


@dataclass(frozen=True, slots=True)
class CreditTerms:
    """The protocol's timing and sizing, shared by both sides (one set per deployment).

    The relay stops admitting on a lease ``margin_ms`` before the validity it was granted, counted from
    the moment it *sent* the sync that was answered, so neither message delay nor a small clock drift
    can make it admit on a lease quota has already closed; quota closes a lease only ``grace_ms`` after
    that validity. ``horizon_ms`` is how long quota keeps holding usage a relay reported but whose
    events have not arrived (a dead relay's spool may still be replayed by another) before giving it up.
    """

    sync_interval_ms: int = 1_000
    valid_for_ms: int = 30_000
    margin_ms: int = 2_000
    grace_ms: int = 5_000
    horizon_ms: int = 3_600_000
    # A lease aims to cover this much of the key's recent spend, so a quota outage shorter than it
    # fails no request of a key that is already leased.
    target_ms: int = 15_000
    # Quota leases a user at most this fraction of what is available, divided over the leases the user
    # already has plus the new one: the rest stays free for other relays and exact reservations.
    share_divisor: int = 2
    # A grant smaller than this many worst cases of the asking request is not worth a lease: the key
    # stays on exact reservations, which cannot strand units.
    floor_requests: int = 4
    # A key with no admission for this long gives its lease back.
    idle_ms: int = 10_000
    # How long a key whose ask was refused stays on exact reservations before asking again.
    exact_for_ms: int = 5_000
    reservation_ttl_ms: int = 900_000

    def __post_init__(self) -> None:
        if not 0 < self.sync_interval_ms < self.valid_for_ms:
            raise ValueError("sync_interval_ms must be positive and shorter than valid_for_ms")
        if not 0 <= self.margin_ms < self.valid_for_ms:
            raise ValueError("margin_ms must be shorter than valid_for_ms")
        if self.share_divisor < 1 or self.floor_requests < 1:
            raise ValueError("share_divisor and floor_requests must be at least 1")


@dataclass(frozen=True, slots=True)
class LeaseAsk:
    """A relay asks for a lease. ``lease_id`` is chosen by the relay, so a retried ask (its answer lost)
    finds the lease it already created instead of opening a second one.

    ``scope`` is ``KEY_SCOPE`` (a lease for ``key_id`` alone) or ``USER_SCOPE`` (a lease the user's keys
    without budgets of their own share; ``key_id`` is the key whose request made the relay ask, which
    quota checks has no budget of its own)."""

    lease_id: str
    key_id: str
    user_id: str
    want_micros: int
    # The worst case of the request waiting for this lease: a smaller grant is useless.
    min_micros: int
    scope: str = KEY_SCOPE


@dataclass(frozen=True, slots=True)
class LeaseReport:
    """What a relay knows of one of its leases, sent with every sync."""

    lease_id: str
    # Cost of the requests finished on the lease; each of them is also a usage event on its way.
    used_micros: int
    # Worst cases of the requests admitted and not finished.
    inflight_micros: int
    # How much more the relay would like on the lease (0: enough).
    want_micros: int = 0
    # The relay admits no more on the lease; quota shrinks it to used + inflight and closes it once
    # nothing is in flight and every reported event has been applied.
    closing: bool = False


@dataclass(frozen=True, slots=True)
class SyncRequest:
    """One relay process's periodic message: every lease it holds, and new asks."""

    relay_id: str
    # Increases with every sync a relay process sends: quota ignores a report older than one it applied
    # (a delayed or repeated message), so an old in-flight figure never overwrites a newer one.
    seq: int
    reports: tuple[LeaseReport, ...] = ()
    asks: tuple[LeaseAsk, ...] = ()
    # The version of the budgeted keys the relay knows ("" before it knows any).
    budgeted_version: str = ""


@dataclass(frozen=True, slots=True)
class BudgetedKeys:
    """The keys with a budget of their own, as quota read them: they may not be admitted on a
    user-scope lease. ``complete`` is False when there are more than quota sends (then every key
    keeps a lease of its own)."""

    version: str
    key_ids: frozenset[str] = frozenset()
    complete: bool = True


@dataclass(frozen=True, slots=True)
class Grant:
    """Quota's answer about one lease.

    ``state``: ``open`` (admit up to ``granted_micros`` in all: used + in flight + the rest),
    ``closing`` (admit nothing more), ``closed`` (gone: forget it), ``refused`` (an ask quota would not
    lease: stay on exact reservations), ``rescope`` (a user-scope ask from a key with a budget of its
    own: that key asks a lease of its own instead).
    """

    lease_id: str
    state: str
    granted_micros: int = 0
    valid_for_ms: int = 0
    # Quota needs the unused part back (another request of the user could not be covered).
    recall: bool = False


@dataclass(frozen=True, slots=True)
class SyncAnswer:
    grants: tuple[Grant, ...] = ()
    # Sent when the relay's ``budgeted_version`` is not quota's.
    budgeted: BudgetedKeys | None = None


@dataclass(frozen=True, slots=True)
class ReserveAsk:
    """The exact path: hold one request's worst case. Idempotent by ``hold_id``."""

    hold_id: str
    key_id: str
    user_id: str
    amount_micros: int


@dataclass(frozen=True, slots=True)
class ReserveAnswer:
    """``held``; ``refused`` (the balance or a budget cannot cover it); or ``retry`` after
    ``retry_after_ms``: it could be covered once leases of the user that quota just recalled come back."""

    hold_id: str
    state: str
    available_micros: int = 0
    retry_after_ms: int = 0


@dataclass(frozen=True, slots=True)
class Charge:
    """The money part of a usage event: what one request cost, against the hold that admitted it."""

    request_id: str
    hold_id: str
    key_id: str
    user_id: str
    cost_micros: int
