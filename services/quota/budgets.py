"""Budgets: spending caps per key and per user over calendar windows (a day, a month).

A budget window is a row of ``budget_usage`` keyed ``(scope, scope_id, period, window_start)`` holding
what the window has spent and what open reservations hold in it. Windows are aligned to the calendar
in the configured time zone (UTC by default): the day starts at midnight, the month on the 1st. A new
window is simply a new row, so a budget resets on its own at the boundary, with no job to run.

The cap of a (scope, period) is the budget stored here with :meth:`Budgets.set_budget`: quota is the
one owner of spending caps (the admin API writes a key's or user's ``limits.daily_budget_micros`` /
``monthly_budget_micros`` here too; auth keeps only rate and concurrency limits). Holds are taken in the
reserve transaction itself (``services.quota.holding``) with the same row locks as the balance, so a
budget can no more be overdrawn by concurrent requests than a balance can. Each window row records the
cap in force at its latest hold (``limit_micros``), so a cap changed mid-window is visible as such.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import and_, bindparam, delete, or_, select
from sqlalchemy.dialects import postgresql, sqlite

from services.common.clock import Clock
from services.common.db import Database
from services.common.errors import InvalidRequest
from services.quota.models import BUDGETS, USAGE

__all__ = [
    "KEY_DAY",
    "KEY_MONTH",
    "PERIODS",
    "SCOPES",
    "USER_DAY",
    "USER_MONTH",
    "BudgetStatus",
    "Budgets",
    "Calendar",
    "WindowKey",
    "window_bit",
]

SCOPES = ("key", "user")
PERIODS = ("day", "month")

# Bits of ``reservations.budget_windows``: the windows a hold was counted in.
KEY_DAY, KEY_MONTH, USER_DAY, USER_MONTH = 1, 2, 4, 8
_BITS = {
    ("key", "day"): KEY_DAY,
    ("key", "month"): KEY_MONTH,
    ("user", "day"): USER_DAY,
    ("user", "month"): USER_MONTH,
}

MAX_BUDGET_MICROS = 10**15

_B = BUDGETS.c
_U = USAGE.c

# Budgets of the keys and users of a batch of reservations, read in the reserve transaction.
STORED_BUDGETS = select(_B.scope, _B.scope_id, _B.period, _B.limit_micros).where(
    or_(
        and_(_B.scope == "key", _B.scope_id.in_(bindparam("keys", expanding=True))),
        and_(_B.scope == "user", _B.scope_id.in_(bindparam("users", expanding=True))),
    )
)
_BUDGETS_OF = select(_B.period, _B.limit_micros).where(
    _B.scope == bindparam("scope"), _B.scope_id == bindparam("sid")
)
_USAGE_OF = select(_U.period, _U.window_start, _U.spent_micros, _U.reserved_micros, _U.limit_micros).where(
    _U.scope == bindparam("scope"),
    _U.scope_id == bindparam("sid"),
    or_(
        and_(_U.period == "day", _U.window_start == bindparam("day")),
        and_(_U.period == "month", _U.window_start == bindparam("month")),
    ),
)
_DELETE_BUDGET = delete(BUDGETS).where(
    _B.scope == bindparam("scope"), _B.scope_id == bindparam("sid"), _B.period == bindparam("per")
)


def window_bit(scope: str, period: str) -> int:
    return _BITS[(scope, period)]


@dataclass(frozen=True, slots=True, order=True)
class WindowKey:
    """The primary key of one budget window row; ordered, so rows are always locked in one order."""

    scope: str
    scope_id: str
    period: str
    window_start: int

    def label(self) -> str:
        noun = "daily" if self.period == "day" else "monthly"
        return f"the {noun} budget of {self.scope} {self.scope_id}"

    def param(self) -> str:
        """The refusal's ``param``: the budget as the admin API's budgets route names it."""
        return f"budgets.{self.scope}.{self.period}"


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    scope: str
    scope_id: str
    period: str
    # The budget stored now (0: none).
    limit_micros: int
    window_start: int
    resets_at: int
    spent_micros: int
    reserved_micros: int
    # The cap in force at the window's latest hold (0: no hold yet).
    effective_limit_micros: int


class Calendar:
    """Day and month windows in one time zone, as Unix seconds of their first instant."""

    def __init__(self, timezone: str = "UTC") -> None:
        try:
            self._tz = ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {timezone!r}") from exc
        # The windows of the latest call; recomputed only when a boundary has passed.
        self._day = (0, 0)
        self._month = (0, 0)

    def windows(self, now: float) -> tuple[int, int]:
        """``(day_start, month_start)`` of the windows containing ``now``."""
        if not self._day[0] <= now < self._day[1]:
            self._day = self._bounds(now, "day")
        if not self._month[0] <= now < self._month[1]:
            self._month = self._bounds(now, "month")
        return self._day[0], self._month[0]

    def end_of(self, period: str, window_start: int) -> int:
        """When the window starting at ``window_start`` ends (the next one starts)."""
        return self._bounds(window_start, period)[1]

    def _bounds(self, now: float, period: str) -> tuple[int, int]:
        local = datetime.datetime.fromtimestamp(now, self._tz)
        if period == "day":
            start = local.replace(hour=0, minute=0, second=0, microsecond=0)
            following = (start + datetime.timedelta(days=1)).date()
        else:
            start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
            following = (start + datetime.timedelta(days=32)).date().replace(day=1)
        # Midnight computed on the wall clock, so a day with a DST change is 23 or 25 hours long.
        end = datetime.datetime.combine(following, datetime.time(), self._tz)
        return int(start.timestamp()), int(end.timestamp())


def _check_scope(scope: str, scope_id: str) -> None:
    if scope not in SCOPES:
        raise InvalidRequest(f"scope must be one of {', '.join(SCOPES)} (got {scope!r})", param="scope")
    if not scope_id or len(scope_id) > 40:
        raise InvalidRequest("scope_id is required (at most 40 characters)", param="scope_id")


class Budgets:
    """Budgets (set and removed here) and the state of each budget's current window."""

    def __init__(self, db: Database, *, clock: Clock, calendar: Calendar) -> None:
        self._db = db
        self._clock = clock
        self._calendar = calendar

    async def set_budget(
        self, *, scope: str, scope_id: str, period: str, limit_micros: int, actor: str = ""
    ) -> BudgetStatus:
        """Store the budget of a key or user for ``period`` (``limit_micros == 0`` removes it).

        Takes effect for the next reservation on every quota process: the reserve transaction reads
        budgets on the primary. Money already spent or held in the current window stays counted.
        """
        _check_scope(scope, scope_id)
        if period not in PERIODS:
            raise InvalidRequest(
                f"period must be one of {', '.join(PERIODS)} (got {period!r})", param="period"
            )
        if not 0 <= limit_micros <= MAX_BUDGET_MICROS:
            raise InvalidRequest(
                f"limit_micros must be between 0 and {MAX_BUDGET_MICROS} (got {limit_micros})",
                param="limit_micros",
            )
        if len(actor) > 200:
            raise InvalidRequest("actor is longer than 200 characters", param="actor")
        now = int(self._clock.time())
        async with self._db.transaction() as session:
            conn = await session.connection()
            if limit_micros == 0:
                await conn.execute(_DELETE_BUDGET, {"scope": scope, "sid": scope_id, "per": period})
            else:
                values = {
                    "scope": scope,
                    "scope_id": scope_id,
                    "period": period,
                    "limit_micros": limit_micros,
                    "actor": actor,
                    "updated_at": now,
                }
                dialect = postgresql if self._db.dialect == "postgresql" else sqlite
                upsert = dialect.insert(BUDGETS).values(values)
                await conn.execute(
                    upsert.on_conflict_do_update(
                        index_elements=["scope", "scope_id", "period"],
                        set_={"limit_micros": limit_micros, "actor": actor, "updated_at": now},
                    )
                )
        [status] = [
            s
            for s in await self.statuses(scope=scope, scope_id=scope_id, consistent=True)
            if s.period == period
        ]
        return status

    async def statuses(self, *, scope: str, scope_id: str, consistent: bool = False) -> list[BudgetStatus]:
        """Both periods of a key or user: the budget and the current window's usage."""
        _check_scope(scope, scope_id)
        day, month = self._calendar.windows(self._clock.time())
        starts = {"day": day, "month": month}
        async with self._db.reader(consistent=consistent) as session:
            conn = await session.connection()
            stored = {
                str(r[0]): int(r[1])
                for r in await conn.execute(_BUDGETS_OF, {"scope": scope, "sid": scope_id})
            }
            usage = {
                str(r[0]): (int(r[2]), int(r[3]), int(r[4]))
                for r in await conn.execute(
                    _USAGE_OF, {"scope": scope, "sid": scope_id, "day": day, "month": month}
                )
            }
        return [
            BudgetStatus(
                scope=scope,
                scope_id=scope_id,
                period=period,
                limit_micros=stored.get(period, 0),
                window_start=starts[period],
                resets_at=self._calendar.end_of(period, starts[period]),
                spent_micros=usage.get(period, (0, 0, 0))[0],
                reserved_micros=usage.get(period, (0, 0, 0))[1],
                effective_limit_micros=usage.get(period, (0, 0, 0))[2],
            )
            for period in PERIODS
        ]
