"""Holding: what a Reserve asks for, and how it is decided against the locked books of its batch.

A hold is granted when ``balance - held >= amount`` and, in every budget window it counts against,
``spent + held + amount <= cap``, computed on rows locked for the whole transaction and including what
earlier operations of the same batch changed (:class:`services.quota.posting.Books`). There is no
shortcut for large balances. The transaction itself is :mod:`services.quota.posting`.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from services.common.errors import BudgetExceeded, Conflict, InsufficientQuota
from services.quota import models
from services.quota.budgets import Calendar, WindowKey, window_bit
from services.quota.limits import Window
from services.quota.pricing import Price

if TYPE_CHECKING:
    from services.quota.posting import Books

__all__ = [
    "Hold",
    "HoldRequest",
    "budget_windows",
    "decide_hold",
    "duplicate",
    "repeat",
    "reservation_row",
    "windows_for",
]


@dataclass(frozen=True, slots=True)
class HoldRequest:
    """One Reserve, priced and checked against the rate limits, ready for the ledger."""

    reservation_id: str
    user_id: str
    key_id: str
    model: str
    price: Price
    amount: int
    created_at: int
    expires_at: int
    day_start: int
    month_start: int
    # Concurrency slots the limiter holds for it (``limits.LEASE_*`` bits).
    leases: int


@dataclass(frozen=True, slots=True)
class Hold:
    """A reservation in state ``held``; ``repeated`` when this call found it already in place."""

    reservation_id: str
    user_id: str
    reserved_micros: int
    price: Price
    # Balance minus every hold of the user, just after this one.
    available_micros: int
    expires_at: int
    repeated: bool = False
    # The RPM and TPM windows after this request (None: no such limit).
    requests: Window | None = None
    tokens: Window | None = None


def budget_windows(op: HoldRequest, stored: dict[tuple[str, str, str], int]) -> list[tuple[WindowKey, int]]:
    """The budget windows a paid request must fit in, with the cap in force for each."""
    if op.amount <= 0:
        return []
    return windows_for(op.key_id, op.user_id, (op.day_start, op.month_start), stored)


def windows_for(
    key_id: str, user_id: str, starts: tuple[int, int], stored: dict[tuple[str, str, str], int]
) -> list[tuple[WindowKey, int]]:
    """The budget windows a hold of ``key_id`` counts against, with the cap of each.

    ``starts`` are the current (day, month) window starts, ``stored`` the budgets by
    ``(scope, scope_id, period)`` (quota's ``budgets`` table, the only source of caps).
    """
    found: list[tuple[WindowKey, int]] = []
    for scope, scope_id in (("key", key_id), ("user", user_id)):
        if not scope_id:
            continue
        for period, start in (("day", starts[0]), ("month", starts[1])):
            cap = stored.get((scope, scope_id, period), 0)
            if cap:
                found.append((WindowKey(scope, scope_id, period, start), cap))
    return found


def _utc(ts: int) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def decide_hold(
    op: HoldRequest, windows: list[tuple[WindowKey, int]], books: Books, calendar: Calendar
) -> Hold | BaseException:
    """Grant ``op`` against ``books`` (recording the hold there) or say precisely why not."""
    available = books.available(op.user_id)
    if op.amount > 0:
        if available < op.amount:
            return InsufficientQuota(
                f"insufficient quota: this request needs {op.amount} micro-units but only "
                f"{max(0, available)} are available"
            )
        for key, cap in windows:
            left = books.window_left(key, cap)
            if op.amount > left:
                ends = calendar.end_of(key.period, key.window_start)
                return BudgetExceeded(
                    f"budget exceeded: {key.label()} is {cap} micro-units and {max(0, left)} are left "
                    f"until {_utc(ends)}; this request needs {op.amount}",
                    param=key.param(),
                    retry_after=float(max(1, ends - op.created_at)),
                )
        books.hold(op.user_id, op.amount, windows)
    return Hold(
        reservation_id=op.reservation_id,
        user_id=op.user_id,
        reserved_micros=op.amount,
        price=op.price,
        available_micros=available - op.amount,
        expires_at=op.expires_at,
    )


def repeat(row: Any, state: str, op: HoldRequest, price: Price, available: int) -> Hold | BaseException:
    """The answer to a Reserve whose id exists already (``row``, now in ``state``)."""
    if row.user_id != op.user_id or row.model != op.model:
        return Conflict(
            f"reservation id {row.id!r} is already used by another request", param="reservation_id"
        )
    if state != models.HELD:
        # Answering "held" here would let the caller spend upstream money against no hold at all.
        return Conflict(
            f"reservation {row.id!r} is already {state}; reserve with a new id", param="reservation_id"
        )
    return Hold(
        reservation_id=row.id,
        user_id=row.user_id,
        reserved_micros=int(row.reserved_micros),
        price=price,
        available_micros=available,
        expires_at=int(row.expires_at),
        repeated=True,
    )


def duplicate(
    op: HoldRequest, first: HoldRequest, answer: Hold | BaseException | None
) -> Hold | BaseException:
    """The answer to a second Reserve of one id within a batch: the first one's, as a repeat."""
    if op.user_id != first.user_id or op.model != first.model:
        return Conflict(
            f"reservation id {op.reservation_id!r} is already used by another request", param="reservation_id"
        )
    if isinstance(answer, Hold):
        return Hold(
            answer.reservation_id,
            answer.user_id,
            answer.reserved_micros,
            answer.price,
            answer.available_micros,
            answer.expires_at,
            repeated=True,
        )
    return (
        answer if answer is not None else Conflict(f"reservation {op.reservation_id!r} could not be decided")
    )


def reservation_row(op: HoldRequest, windows: list[tuple[WindowKey, int]]) -> dict[str, Any]:
    """The ``reservations`` row of a granted hold."""
    bits = 0
    for key, _ in windows:
        bits |= window_bit(key.scope, key.period)
    periods = {key.period for key, _ in windows}
    return {
        "id": op.reservation_id,
        "user_id": op.user_id,
        "key_id": op.key_id,
        "model": op.model,
        "price_id": op.price.price_id,
        "reserved_micros": op.amount,
        "state": models.HELD,
        "charged_micros": 0,
        "usage": {},
        "created_at": op.created_at,
        "expires_at": op.expires_at,
        "finished_at": 0,
        "budget_windows": bits,
        "day_start": op.day_start if "day" in periods else 0,
        "month_start": op.month_start if "month" in periods else 0,
        "leases": op.leases,
    }
