"""Tables owned by quota: the price book, balances, budgets, reservations and the ledger.

The ledger is append-only and is the record of every change to a balance:
``accounts.balance_micros == sum(ledger_entries.amount_micros)`` for each user at every commit. Budget
usage is derived the same way: each ``budget_usage`` row equals the sum of the holds and charges of the
reservations that name its window (``services.quota.reconcile`` checks all of it).
"""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import JSON, Boolean, CheckConstraint, Index, String, Table, UniqueConstraint, false
from sqlalchemy.orm import Mapped, mapped_column

from services.common.db import Base

# Reservation states: held -> settled | released | expired.
HELD = "held"
SETTLED = "settled"
RELEASED = "released"
EXPIRED = "expired"
STATES = (HELD, SETTLED, RELEASED, EXPIRED)

# Kinds of hold: a per-request reservation (the exact path) or a relay's lease.
RESERVATION = "reservation"
LEASE = "lease"


class Price(Base):
    """One version of a model's price. A change inserts a new row; charges keep the id they used."""

    __tablename__ = "prices"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(200), index=True)
    input_per_mtok: Mapped[int] = mapped_column(default=0)
    output_per_mtok: Mapped[int] = mapped_column(default=0)
    cached_input_per_mtok: Mapped[int] = mapped_column(default=0)
    cache_write_per_mtok: Mapped[int] = mapped_column(default=0)
    reasoning_per_mtok: Mapped[int] = mapped_column(default=0)
    per_request: Mapped[int] = mapped_column(default=0)
    per_image: Mapped[int] = mapped_column(default=0)
    default_max_output_tokens: Mapped[int] = mapped_column(default=4096)
    created_at: Mapped[int]


class Account(Base):
    """A user's prepaid balance and what is currently held against it."""

    __tablename__ = "accounts"
    __table_args__ = (
        CheckConstraint("reserved_micros >= 0", name="reserved_non_negative"),
        CheckConstraint("balance_micros >= reserved_micros", name="holds_covered"),
    )

    user_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    balance_micros: Mapped[int] = mapped_column(default=0)
    reserved_micros: Mapped[int] = mapped_column(default=0)
    updated_at: Mapped[int] = mapped_column(default=0)


class Budget(Base):
    """A spending cap for one key or user over a calendar window (day or month).

    The only source of budgets: set with ``SetBudget`` (the admin API's budgets route, and its key and
    user routes for the ``limits.*_budget_micros`` fields operators send there); auth stores none.
    """

    __tablename__ = "budgets"
    __table_args__ = (CheckConstraint("limit_micros > 0", name="limit_positive"),)

    # key | user
    scope: Mapped[str] = mapped_column(String(8), primary_key=True)
    scope_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    # day | month
    period: Mapped[str] = mapped_column(String(8), primary_key=True)
    limit_micros: Mapped[int]
    actor: Mapped[str] = mapped_column(String(200), default="")
    updated_at: Mapped[int]


class BudgetUsage(Base):
    """What one budget window has spent and holds. A new window is a new row, so budgets reset alone."""

    __tablename__ = "budget_usage"
    __table_args__ = (
        CheckConstraint("spent_micros >= 0", name="spent_non_negative"),
        CheckConstraint("reserved_micros >= 0", name="reserved_non_negative"),
    )

    scope: Mapped[str] = mapped_column(String(8), primary_key=True)
    scope_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    period: Mapped[str] = mapped_column(String(8), primary_key=True)
    # Unix seconds of the window's first instant (midnight / the 1st, in the budget time zone).
    window_start: Mapped[int] = mapped_column(primary_key=True)
    spent_micros: Mapped[int] = mapped_column(default=0)
    reserved_micros: Mapped[int] = mapped_column(default=0)
    # The cap in force at the latest hold; bounds overage charges against this window.
    limit_micros: Mapped[int] = mapped_column(default=0)
    updated_at: Mapped[int] = mapped_column(default=0)


class Reservation(Base):
    """A hold on a balance and its budget windows: one request's reservation, or a relay's lease.

    A lease (``kind = 'lease'``) is ``held`` while quota's books have it open, closing or expired
    (``phase``); ``reserved_micros`` is what it holds now (granted - applied) and ``charged_micros``
    what its usage events charged (applied + over). It ends ``settled`` when its relay closed it and
    ``expired`` when quota gave it up. ``model`` is empty and ``price_id`` 0: its requests carry theirs.
    """

    __tablename__ = "reservations"
    __table_args__ = (
        Index("ix_reservations_state_expires", "state", "expires_at"),
        Index("ix_reservations_kind_state_expires_ms", "kind", "state", "expires_at_ms"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(40), index=True)
    key_id: Mapped[str] = mapped_column(String(40))
    model: Mapped[str] = mapped_column(String(200))
    price_id: Mapped[int]
    reserved_micros: Mapped[int]
    # held -> settled | released | expired
    state: Mapped[str] = mapped_column(String(16), default="held")
    charged_micros: Mapped[int] = mapped_column(default=0)
    usage: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[int]
    expires_at: Mapped[int]
    finished_at: Mapped[int] = mapped_column(default=0)
    # The budget windows this hold counts against (``budgets.KEY_DAY | KEY_MONTH | USER_DAY |
    # USER_MONTH`` bits) and their starts; settle moves the money in exactly those windows.
    budget_windows: Mapped[int] = mapped_column(default=0, server_default="0")
    day_start: Mapped[int] = mapped_column(default=0, server_default="0")
    month_start: Mapped[int] = mapped_column(default=0, server_default="0")
    # Concurrency slots taken (``limits.LEASE_KEY | LEASE_USER``), given back when it finishes.
    leases: Mapped[int] = mapped_column(default=0, server_default="0")
    # reservation | lease; the columns below are a lease's (``services.quota.credit.Hold``).
    kind: Mapped[str] = mapped_column(String(16), default=RESERVATION, server_default=RESERVATION)
    relay_id: Mapped[str] = mapped_column(String(64), default="", server_default="")
    granted_micros: Mapped[int] = mapped_column(default=0, server_default="0")
    applied_micros: Mapped[int] = mapped_column(default=0, server_default="0")
    over_micros: Mapped[int] = mapped_column(default=0, server_default="0")
    used_reported_micros: Mapped[int] = mapped_column(default=0, server_default="0")
    inflight_reported_micros: Mapped[int] = mapped_column(default=0, server_default="0")
    seq: Mapped[int] = mapped_column(default=-1, server_default="-1")
    recall: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # open | closing | expired | closed (leases only; empty for reservations).
    phase: Mapped[str] = mapped_column(String(16), default="", server_default="")
    # Given up by quota because its relay stopped syncing.
    given_up: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # Leases run on milliseconds; ``expires_at`` is kept as its ceiling in seconds.
    expires_at_ms: Mapped[int] = mapped_column(default=0, server_default="0")


class LedgerEntry(Base):
    """Append-only: top-ups and adjustments (signed), one charge per settled reservation (or per expired
    or released one its usage event charged late), and one per request charged on a lease
    (``reservation_id`` = the request id, ``hold_id`` = the lease)."""

    __tablename__ = "ledger_entries"
    __table_args__ = (
        UniqueConstraint("reservation_id", name="uq_ledger_entries_reservation_id"),
        UniqueConstraint("idempotency_key", name="uq_ledger_entries_idempotency_key"),
    )

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(String(40), index=True)
    # topup | adjustment | charge
    kind: Mapped[str] = mapped_column(String(16))
    amount_micros: Mapped[int]
    reservation_id: Mapped[str | None] = mapped_column(String(64))
    price_id: Mapped[int | None]
    idempotency_key: Mapped[str | None] = mapped_column(String(128))
    actor: Mapped[str] = mapped_column(String(200), default="")
    reason: Mapped[str] = mapped_column(String(500), default="")
    # How a charge was decided: capped, overage, estimated; late (after its hold was given up),
    # beyond_hold, written_off.
    flags: Mapped[str] = mapped_column(String(100), default="")
    created_at: Mapped[int]
    # The reservation or lease a charge is against (its ``reservations.id``).
    hold_id: Mapped[str | None] = mapped_column(String(64), index=True, default=None)
    # What a late charge could not take from the balance: on the books, never collected.
    written_off_micros: Mapped[int] = mapped_column(default=0, server_default="0")


# The tables as SQLAlchemy Core sees them: the money path locks and posts with Core statements (no
# identity map to fill for rows it reads once).
ACCOUNTS = cast(Table, Account.__table__)
RESERVATIONS = cast(Table, Reservation.__table__)
ENTRIES = cast(Table, LedgerEntry.__table__)
BUDGETS = cast(Table, Budget.__table__)
USAGE = cast(Table, BudgetUsage.__table__)
