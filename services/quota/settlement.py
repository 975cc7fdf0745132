"""Settlement: finishing a reservation by settle (charge the usage), release (charge nothing) or
expiry (charge nothing, flagged ``expired``), decided against the locked books of its batch.

Why expiry charges nothing: a hold that nobody settled within its TTL belongs to a relay that died
(or lost quota for longer than its settle retries last). Quota has no evidence that such a request
ever reached an upstream, and charging the worst case here would bill requests that never ran and
make the ledger disagree with the request logs. What this costs the operator when a relay dies is
bounded by that relay's in-flight requests (README, failure policy). A Settle arriving after the
expiry finds the reservation finished and gets the stored outcome: nothing is charged twice.

The usage event is the exception, because it is the evidence: its relay logged the cost. An event
that reaches quota after its reservation was finished without a charge (expired: a Kafka outage or a
consumer lag longer than the TTL; or released, as if nothing had been delivered) is charged *late*
(:mod:`services.quota.late_charges`) by the rule lease charges follow: from what the balance and the
reservation's budget windows still have free, the rest written off and recorded next to the charge.
So the ledger holds one entry per charged request id whose charge plus write-off is the logged cost,
on time or late; the TTL only decides whether a late event may find the balance spent meanwhile.

Ledger entries: a settled reservation has exactly one ``charge`` entry (its negated charge, possibly
0); a released or expired one has none, unless its event charged it late, then exactly one (flag
``late``). Reservations that expired before late charges existed keep the zero entry their expiry
wrote, and a late event finds it and charges nothing.

Only an operation that finds its reservation ``held`` finishes it; every other one (a retry, a settle
racing a release, two sweepers, in one batch or across processes) gets the stored outcome with
``repeated=True``. A charge never exceeds the hold (flag ``capped``) unless overage is allowed; then it
is bounded by what the balance and every budget window of the hold still cover (flag ``overage``). An
estimated usage is always capped at the hold. The transaction itself is :mod:`services.quota.posting`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from services.quota import models
from services.quota.budgets import PERIODS, SCOPES, WindowKey, window_bit
from services.quota.pricing import PriceBook, Usage, cost

if TYPE_CHECKING:
    from services.quota.posting import Books

__all__ = [
    "FLAG_BEYOND_HOLD",
    "FLAG_CAPPED",
    "FLAG_ESTIMATED",
    "FLAG_EXPIRED",
    "FLAG_LATE",
    "FLAG_OVERAGE",
    "FLAG_WRITTEN_OFF",
    "Charge",
    "FinishRequest",
    "Outcome",
    "charge_for",
    "repeated",
    "windows_of",
]

# Ledger entry flags.
FLAG_CAPPED = "capped"
FLAG_OVERAGE = "overage"
FLAG_ESTIMATED = "estimated"
FLAG_EXPIRED = "expired"
# A late charge (the names lease charges use too): charged after its hold was given up, taken from
# what was free, and what that could not cover written off.
FLAG_LATE = "late"
FLAG_BEYOND_HOLD = "beyond_hold"
FLAG_WRITTEN_OFF = "written_off"


@dataclass(frozen=True, slots=True)
class FinishRequest:
    reservation_id: str
    # The state to move to: settled | released | expired.
    target: str
    now: int
    # settle: what the request used.
    usage: Usage | None = None
    # settle from a usage event: the cost its relay computed at the hold's price (the number the
    # request logs carry), charged instead of pricing ``usage`` again.
    cost_micros: int | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a reservation finished: ``settled``, ``released`` or ``expired``."""

    reservation_id: str
    state: str
    charged_micros: int
    reserved_micros: int
    price_id: int
    # True when this call found the reservation already finished (a repeat or a lost race).
    repeated: bool
    flags: tuple[str, ...] = ()
    # Whose concurrency slots to give back (``limits.LEASE_*`` bits).
    user_id: str = ""
    key_id: str = ""
    leases: int = 0
    # What a late charge could not take from the balance (on the books, never collected).
    written_off_micros: int = 0


def windows_of(row: Any) -> list[WindowKey]:
    """The budget windows a reservation row holds against."""
    found: list[WindowKey] = []
    for scope in SCOPES:
        for period in PERIODS:
            if int(row.budget_windows) & window_bit(scope, period):
                scope_id = row.key_id if scope == "key" else row.user_id
                start = row.day_start if period == "day" else row.month_start
                found.append(WindowKey(scope, str(scope_id), period, int(start)))
    return found


@dataclass(slots=True)
class Charge:
    """A decided finish: what it charges, with which flags, and the reservation row it finishes."""

    op: FinishRequest
    row: Any
    charged: int
    flags: tuple[str, ...]

    @property
    def reserved(self) -> int:
        return int(self.row.reserved_micros)

    def outcome(self) -> Outcome:
        return Outcome(
            reservation_id=str(self.row.id),
            state=self.op.target,
            charged_micros=self.charged,
            reserved_micros=self.reserved,
            price_id=int(self.row.price_id),
            repeated=False,
            flags=self.flags,
            user_id=str(self.row.user_id),
            key_id=str(self.row.key_id),
            leases=int(self.row.leases),
        )


async def charge_for(
    op: FinishRequest, row: Any, prices: PriceBook, books: Books, *, allow_overage: bool
) -> Charge:
    """Decide what finishing ``row`` charges and record it in ``books``."""
    reserved = int(row.reserved_micros)
    windows = windows_of(row)
    if op.target == models.RELEASED:
        charge = Charge(op, row, 0, ())
    elif op.target == models.EXPIRED:
        charge = Charge(op, row, 0, (FLAG_EXPIRED,))
    else:
        usage = op.usage or Usage()
        if op.cost_micros is not None:
            full = op.cost_micros
        else:
            full = cost(await prices.by_id(int(row.price_id)), usage)
        marks = (FLAG_ESTIMATED,) if usage.estimated else ()
        if full <= reserved:
            charge = Charge(op, row, full, marks)
        elif usage.estimated or not allow_overage:
            charge = Charge(op, row, reserved, (FLAG_CAPPED, *marks))
        else:
            # No account: only a free hold (0 reserved) gets here, and nothing can be charged.
            charged = max(reserved, min(full, books.room(str(row.user_id), windows, reserved)))
            over = (FLAG_OVERAGE,) if charged > reserved else ()
            capped = (FLAG_CAPPED,) if charged < full else ()
            charge = Charge(op, row, charged, over + capped)
    books.finish(str(row.user_id), windows, charged=charge.charged, released=reserved)
    return charge


def repeated(done: Outcome | None, row: Any) -> Outcome:
    """The stored outcome of a finished reservation, for a repeated or losing call."""
    if done is not None:
        return Outcome(
            done.reservation_id,
            done.state,
            done.charged_micros,
            done.reserved_micros,
            done.price_id,
            repeated=True,
            flags=done.flags,
            user_id=done.user_id,
            key_id=done.key_id,
            leases=done.leases,
        )
    flags = tuple(flag for flag in (row.flags or "").split(",") if flag)
    if row.state == models.EXPIRED and FLAG_EXPIRED not in flags:
        # Expiry writes no ledger entry (whose flags the row is read with); its state says it.
        flags = (FLAG_EXPIRED, *flags)
    return Outcome(
        reservation_id=str(row.id),
        state=str(row.state),
        charged_micros=int(row.charged_micros),
        reserved_micros=int(row.reserved_micros),
        price_id=int(row.price_id),
        repeated=True,
        flags=flags,
        user_id=str(row.user_id),
        key_id=str(row.key_id),
        leases=int(row.leases),
    )
