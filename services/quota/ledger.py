"""Balances, holds and the append-only ledger: reserve, settle, release, expire, top up, read.

Invariants, at every commit, whatever the concurrency and however many quota processes run:

* ``accounts.balance_micros >= accounts.reserved_micros >= 0`` (also a CHECK in the schema): a balance
  never goes below zero and never below what is held;
* ``accounts.balance_micros == sum(ledger_entries.amount_micros)`` per user: top-ups are positive,
  adjustments signed, and each settled reservation has exactly one ``charge`` entry (its negated
  charge, possibly 0); a released or expired one has none unless its usage event charged it late,
  then exactly one (flag ``late``, with what it wrote off);
* ``accounts.reserved_micros == sum(reservations.reserved_micros where state = 'held')`` per user;
* every budget window: ``spent + held <= cap`` at each hold, and its ``spent`` and ``reserved`` equal
  the charges and holds of the reservations counted in it.

How: :meth:`Ledger.reserve` checks the rate and concurrency limits first (one atomic call to the
limiter, :mod:`services.quota.limits`), then holds the worst-case cost against the balance and every
budget window (:mod:`services.quota.holding`); a refusal there gives the limiter's share back. Settle,
release and expiry finish a reservation after locking it, so exactly one caller finishes it and every
other gets the stored outcome (:mod:`services.quota.settlement`); its concurrency slot is freed after
the commit. A usage event that arrives after its reservation was finished without a charge is charged
late (:mod:`services.quota.late_charges`). Concurrent reserves and finishes share one transaction on
the primary (:mod:`services.quota.posting`, batched by :mod:`services.quota.group_commit`).
:mod:`services.quota.reconcile` checks the invariants after the fact.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, bindparam, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from services.common.clock import Clock
from services.common.db import Database
from services.common.errors import (
    BudgetExceeded,
    Conflict,
    CreditRecalled,
    InsufficientQuota,
    InvalidRequest,
    QuotaError,
)
from services.common.telemetry import METRICS
from services.quota import models
from services.quota.budgets import Calendar
from services.quota.group_commit import GroupCommit
from services.quota.holding import Hold, HoldRequest
from services.quota.late_charges import LATE_STATES, LateCharges
from services.quota.leasing import CreditStore
from services.quota.limits import NO_LIMITS, Limiter, LimitRequest, Limits, LocalLimiter, Ticket, lease_names
from services.quota.models import ACCOUNTS, ENTRIES, EXPIRED, HELD, RELEASED, RESERVATIONS, SETTLED, STATES
from services.quota.posting import Operation, Posting, Result
from services.quota.pricing import MAX_CHOICES, MAX_IMAGES, MAX_TOKENS, PriceBook, Usage, worst_case
from services.quota.reconcile import Discrepancy, reconcile
from services.quota.settlement import FLAG_LATE, FinishRequest, Outcome

__all__ = [
    "EXPIRED",
    "HELD",
    "RELEASED",
    "SETTLED",
    "BalanceView",
    "BatchPolicy",
    "Discrepancy",
    "Hold",
    "Ledger",
    "Outcome",
    "ReservationPage",
    "ReservationView",
]

log = logging.getLogger(__name__)

# Keeps a balance far below 2**63 micro-units whatever is added.
MAX_TOP_UP_MICROS = 10**15
MAX_PAGE = 500

_A = ACCOUNTS.c
_R = RESERVATIONS.c
_L = ENTRIES.c

_BALANCE = select(_A.balance_micros, _A.reserved_micros).where(_A.user_id == bindparam("uid"))
_CREDIT = (
    update(ACCOUNTS)
    .where(_A.user_id == bindparam("uid"))
    .values(balance_micros=_A.balance_micros + bindparam("amount"), updated_at=bindparam("now"))
    .returning(_A.balance_micros, _A.reserved_micros)
)
# An adjustment down may not uncover what open reservations hold.
_DEBIT = _CREDIT.where(_A.balance_micros + bindparam("amount") >= _A.reserved_micros)
# Leases expire on their own clock (``services.quota.leasing``).
_DUE = (
    select(_R.id)
    .where(_R.kind == models.RESERVATION, _R.state == HELD, _R.expires_at <= bindparam("cutoff"))
    .order_by(_R.expires_at)
    .limit(bindparam("batch"))
)
_INSERT_ENTRY = insert(ENTRIES)
_ENTRY_OWNER = select(_L.user_id).where(_L.idempotency_key == bindparam("key"))
_PAGE = (
    select(
        _R.id,
        _R.user_id,
        _R.key_id,
        _R.model,
        _R.price_id,
        _R.reserved_micros,
        _R.state,
        _R.charged_micros,
        _R.usage,
        _R.created_at,
        _R.expires_at,
        _R.finished_at,
    )
    .where(_R.user_id == bindparam("uid"))
    .order_by(_R.created_at.desc(), _R.id.desc())
    .limit(bindparam("rows"))
)


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """How many operations share a transaction, and how many such transactions run at once."""

    max_batch: int = 64
    concurrency: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.max_batch <= 1000 or not 1 <= self.concurrency <= 64:
            raise ValueError("max_batch must be 1..1000 and concurrency 1..64")


@dataclass(frozen=True, slots=True)
class BalanceView:
    user_id: str
    balance_micros: int
    reserved_micros: int
    # After a write: the primary's WAL position including it (0 on SQLite and for plain reads).
    written_lsn: int = 0

    @property
    def available_micros(self) -> int:
        return self.balance_micros - self.reserved_micros


@dataclass(frozen=True, slots=True)
class ReservationView:
    reservation_id: str
    user_id: str
    key_id: str
    model: str
    price_id: int
    reserved_micros: int
    state: str
    charged_micros: int
    usage: Usage
    created_at: int
    expires_at: int
    finished_at: int


@dataclass(frozen=True, slots=True)
class ReservationPage:
    reservations: tuple[ReservationView, ...]
    # Pass back to get the next page; empty on the last one.
    next_cursor: str


def _require(name: str, value: str, max_len: int) -> None:
    if not value:
        raise InvalidRequest(f"{name} is required", param=name)
    _limit_length(name, value, max_len)


def _limit_length(name: str, value: str, max_len: int) -> None:
    if len(value) > max_len:
        raise InvalidRequest(f"{name} is longer than {max_len} characters", param=name)


def _check_count(name: str, value: int, limit: int) -> None:
    if not 0 <= value <= limit:
        raise InvalidRequest(f"{name} must be between 0 and {limit} (got {value})", param=name)


class Ledger:
    """The accounting operations. ``clock`` supplies every timestamp, so expiry and budget windows
    are testable without sleeping; ``limiter`` defaults to in-process limits (one quota process);
    ``credit`` (the relays' leases) lets a refused Reserve recall leases of its user."""

    def __init__(
        self,
        db: Database,
        prices: PriceBook,
        *,
        clock: Clock,
        reservation_ttl_s: int,
        allow_overage: bool = False,
        expiry_batch_size: int = 100,
        limiter: Limiter | None = None,
        calendar: Calendar | None = None,
        batching: BatchPolicy | None = None,
        replica_wait_s: float = 0.05,
        credit: CreditStore | None = None,
    ) -> None:
        self._db = db
        self._credit = credit
        self._prices = prices
        self._clock = clock
        self._ttl = reservation_ttl_s
        self._batch = expiry_batch_size
        self._limiter: Limiter = limiter or LocalLimiter(clock)
        self._calendar = calendar or Calendar()
        self._replica_wait_s = replica_wait_s
        batching = batching or BatchPolicy()
        posting = Posting(db, prices, self._calendar, allow_overage=allow_overage)
        self._late = LateCharges(
            db,
            allow_overage=allow_overage,
            max_batch=batching.max_batch,
            concurrency=batching.concurrency,
        )
        # Reserves and finishes share transactions: one commit for both, one update per account.
        self._posting = GroupCommit[Operation, Result](
            "ledger", posting.execute, max_batch=batching.max_batch, concurrency=batching.concurrency
        )

    async def close(self) -> None:
        """Wait for the batches in flight; call after the server stopped taking requests."""
        await self._posting.close()
        await self._late.close()

    @contextlib.asynccontextmanager
    async def _reading(self, *, consistent: bool) -> AsyncIterator[AsyncConnection]:
        async with self._db.reader(consistent=consistent) as session:
            yield await session.connection()

    # -- reserve ------------------------------------------------------------------------------------

    async def reserve(
        self,
        *,
        reservation_id: str,
        user_id: str,
        model: str,
        prompt_tokens: int,
        max_output_tokens: int = 0,
        images: int = 0,
        choices: int = 1,
        key_id: str = "",
        key_limits: Limits = NO_LIMITS,
        user_limits: Limits = NO_LIMITS,
    ) -> Hold:
        """Check the key's and user's limits and hold the worst-case cost of a request.

        Raises :class:`RateLimited` / :class:`ConcurrencyLimited` (with ``retry_after``) for the
        limits, :class:`InsufficientQuota` when ``balance - held`` cannot cover the hold (a user
        without an account has 0), :class:`BudgetExceeded` naming the budget that cannot, and
        :class:`ModelNotFound` for an unpriced model. Idempotent by ``reservation_id``: a repeat
        returns the existing hold without holding twice, and :class:`Conflict` when that id belongs
        to another request or has already finished.
        """
        _require("reservation_id", reservation_id, 64)
        _require("user_id", user_id, 40)
        _limit_length("key_id", key_id, 40)
        _check_count("prompt_tokens", prompt_tokens, MAX_TOKENS)
        _check_count("max_output_tokens", max_output_tokens, MAX_TOKENS)
        _check_count("images", images, MAX_IMAGES)
        _check_count("choices", choices, MAX_CHOICES)
        choices = max(1, choices)
        key_limits.validate("key_limits")
        user_limits.validate("user_limits")
        price = await self._prices.current(model)
        amount = worst_case(
            price,
            prompt_tokens=prompt_tokens,
            max_output_tokens=max_output_tokens,
            images=images,
            choices=choices,
        )
        now = self._clock.time()
        created_at = int(now)
        expires_at = created_at + self._ttl
        limits = LimitRequest.build(
            reservation_id=reservation_id,
            key_id=key_id,
            user_id=user_id,
            key_limits=key_limits,
            user_limits=user_limits,
            tokens=prompt_tokens + (max_output_tokens or price.default_max_output_tokens) * choices,
            lease_until=expires_at,
        )
        try:
            ticket = await self._limiter.acquire(limits)
        except QuotaError as exc:
            METRICS.quota_rejections.labels(reason=exc.code).inc()
            raise
        day_start, month_start = self._calendar.windows(now)
        request = HoldRequest(
            reservation_id=reservation_id,
            user_id=user_id,
            key_id=key_id,
            model=model,
            price=price,
            amount=amount,
            created_at=created_at,
            expires_at=expires_at,
            day_start=day_start,
            month_start=month_start,
            leases=ticket.lease_bits,
        )
        try:
            hold = await self._posting.submit(request)
            if not isinstance(hold, Hold):
                raise TypeError(f"a reserve was answered with {hold!r}")
        except Exception as exc:
            # Definitely not held (a cancelled caller is not: its batch may still commit).
            await self._give_back(ticket)
            if isinstance(exc, InsufficientQuota | BudgetExceeded):
                retry_after = await self._recalled(request)
                if retry_after is not None:
                    METRICS.quota_rejections.labels(reason=CreditRecalled.code).inc()
                    raise CreditRecalled(
                        f"{exc.message}; leases of this user hold unused credit and are being recalled",
                        param=exc.param,
                        retry_after=retry_after,
                    ) from None
            if isinstance(exc, QuotaError):
                METRICS.quota_rejections.labels(reason=exc.code).inc()
            raise
        if hold.repeated:
            await self._give_back(ticket)
        return dataclasses.replace(hold, requests=ticket.requests, tokens=ticket.tokens)

    async def _recalled(self, request: HoldRequest) -> float | None:
        """Seconds until a retry of ``request`` may be covered by the user's recalled leases; None
        when the refusal stands."""
        if self._credit is None:
            return None
        try:
            return await self._credit.recall(request)
        except Exception:
            # The refusal stands; the caller sees the balance error it would have seen anyway.
            log.warning("could not recall leases", exc_info=True)
            return None

    async def _give_back(self, ticket: Ticket) -> None:
        try:
            await self._limiter.rollback(ticket)
        except Exception:
            # Counters lapse within a minute and slots with the TTL: never worth failing the request.
            log.warning("could not give back rate/concurrency counts", exc_info=True)

    # -- settle, release, expire ----------------------------------------------------------------------

    async def settle(self, reservation_id: str, usage: Usage) -> Outcome:
        """Charge ``usage`` at the reservation's price and return the rest of the hold.

        The charge never exceeds the hold (flag ``capped``) unless overage is allowed, in which case
        it is bounded by what the balance and the hold's budget windows cover beyond other holds
        (flag ``overage``). An estimated usage (flag ``estimated``) is always capped at the hold. A
        repeat, or a settle that lost a race with release or expiry, returns the stored outcome with
        ``repeated=True``; :class:`NotFound` for an unknown id.
        """
        _require("reservation_id", reservation_id, 64)
        usage.validate()
        return await self._finish(FinishRequest(reservation_id, SETTLED, int(self._clock.time()), usage))

    async def settle_charged(self, reservation_id: str, usage: Usage, cost_micros: int) -> Outcome:
        """Settle from the request's usage event: charge ``cost_micros`` (what its relay computed at
        the hold's price and logged) under the rules of :meth:`settle`, and free its concurrency slots.

        Idempotent with :meth:`settle`, :meth:`release` and expiry: whichever finishes the hold first
        decides. When that was expiry or a release (nothing charged), the event is charged late
        (:mod:`services.quota.late_charges`: from what is free, the rest written off; flag ``late``)
        and the answer has ``repeated=False``. Every later call gets the stored outcome
        (``repeated=True``).
        """
        _require("reservation_id", reservation_id, 64)
        usage.validate()
        if cost_micros < 0:
            raise InvalidRequest(f"cost_micros must not be negative (got {cost_micros})", param="cost_micros")
        now = int(self._clock.time())
        outcome = await self._finish(FinishRequest(reservation_id, SETTLED, now, usage, cost_micros))
        if not outcome.repeated or outcome.state not in LATE_STATES or FLAG_LATE in outcome.flags:
            return outcome
        return await self._late.charge(reservation_id, usage, cost_micros, now)

    async def release(self, reservation_id: str, reason: str = "") -> Outcome:
        """Return the whole hold; nothing is charged and no ledger entry is written.

        A repeat, or a release after settle or expiry, changes nothing and returns the stored outcome
        with ``repeated=True``; :class:`NotFound` for an unknown id.
        """
        _require("reservation_id", reservation_id, 64)
        outcome = await self._finish(FinishRequest(reservation_id, RELEASED, int(self._clock.time())))
        if not outcome.repeated:
            log.debug(
                "reservation released", extra={"reservation_id": reservation_id, "reason": reason[:200]}
            )
        return outcome

    async def _finish(self, request: FinishRequest) -> Outcome:
        outcome = await self._posting.submit(request)
        if not isinstance(outcome, Outcome):
            raise TypeError(f"a {request.target} was answered with {outcome!r}")
        await self._free_slots(outcome)
        return outcome

    async def _free_slots(self, outcome: Outcome) -> None:
        if not outcome.repeated:
            METRICS.quota_finished.labels(state=outcome.state).inc()
        names = lease_names(outcome.key_id, outcome.user_id, outcome.leases)
        if names:
            # Also on a repeat: freeing is idempotent, and the first attempt may have failed.
            await self._limiter.release(outcome.reservation_id, names)

    async def expire_due(self, now: float | None = None) -> int:
        """Close every hold whose TTL has passed, charging nothing (state and flag ``expired``, no
        ledger entry; see :mod:`services.quota.settlement` for why and for the usage event that may
        still charge it late), and free its concurrency slot.

        Works through the backlog ``expiry_batch_size`` reservations at a time. Safe to run in
        several quota processes at once: the reservation lock decides which one charges. Returns
        how many this call expired.
        """
        cutoff = int(self._clock.time() if now is None else now)
        expired = 0
        while True:
            async with self._reading(consistent=True) as conn:
                due = (await conn.scalars(_DUE, {"cutoff": cutoff, "batch": self._batch})).all()
            outcomes = await asyncio.gather(
                *(self._posting.submit(FinishRequest(rid, EXPIRED, cutoff)) for rid in due)
            )
            for outcome in outcomes:
                if isinstance(outcome, Outcome):
                    expired += 1
                    await self._free_slots(outcome)
            if len(due) < self._batch:
                break
        if expired:
            log.info("expired reservations released (nothing charged)", extra={"count": expired})
        return expired

    async def maintain(self) -> None:
        """Periodic upkeep of the limiter (frees slots whose release failed during an outage)."""
        await self._limiter.maintain()

    # -- balances ------------------------------------------------------------------------------------

    async def top_up(
        self,
        *,
        user_id: str,
        amount_micros: int,
        reason: str = "",
        actor: str = "",
        idempotency_key: str = "",
    ) -> BalanceView:
        """Add ``amount_micros`` (negative: an adjustment down) and write one ledger entry.

        Creates the account when missing. An adjustment that would leave the balance below what open
        reservations hold is refused with :class:`InvalidRequest`. With an ``idempotency_key``, a
        repeat writes nothing and returns the current balance (:class:`Conflict` if that key was used
        for another user). The answer carries ``written_lsn`` for a later read-your-write.
        """
        _require("user_id", user_id, 40)
        _limit_length("reason", reason, 500)
        _limit_length("actor", actor, 200)
        _limit_length("idempotency_key", idempotency_key, 128)
        if amount_micros == 0 or abs(amount_micros) > MAX_TOP_UP_MICROS:
            raise InvalidRequest(
                f"amount_micros must be non-zero and at most {MAX_TOP_UP_MICROS} either way "
                f"(got {amount_micros})",
                param="amount_micros",
            )
        key = idempotency_key or None
        try:
            view = await self._top_up(user_id, amount_micros, reason, actor, key)
        except IntegrityError:
            # The same key committed concurrently; this attempt rolled back entirely.
            if key is None:
                raise
            async with self._reading(consistent=True) as conn:
                repeat = await self._topup_repeat(conn, key, user_id)
            if repeat is None:
                raise
            view = repeat
        return dataclasses.replace(view, written_lsn=await self._db.primary_lsn() or 0)

    async def _top_up(
        self, user_id: str, amount_micros: int, reason: str, actor: str, key: str | None
    ) -> BalanceView:
        now = int(self._clock.time())
        async with self._db.transaction() as session:
            conn = await session.connection()
            if key is not None and (repeat := await self._topup_repeat(conn, key, user_id)):
                return repeat
            await conn.execute(self._insert_account_if_missing(user_id, now))
            change = _CREDIT if amount_micros > 0 else _DEBIT
            row = (
                await conn.execute(change, {"uid": user_id, "amount": amount_micros, "now": now})
            ).one_or_none()
            if row is None:
                current = await self._read_balance(conn, user_id)
                raise InvalidRequest(
                    f"an adjustment of {amount_micros} would leave a balance of "
                    f"{current.balance_micros + amount_micros}, below the {current.reserved_micros} "
                    "held by open reservations",
                    param="amount_micros",
                )
            await conn.execute(
                _INSERT_ENTRY,
                {
                    "user_id": user_id,
                    "kind": "topup" if amount_micros > 0 else "adjustment",
                    "amount_micros": amount_micros,
                    "reservation_id": None,
                    "price_id": None,
                    "idempotency_key": key,
                    "actor": actor,
                    "reason": reason,
                    "flags": "",
                    "created_at": now,
                },
            )
            return BalanceView(user_id, int(row[0]), int(row[1]))

    async def _topup_repeat(self, conn: AsyncConnection, key: str, user_id: str) -> BalanceView | None:
        owner = await conn.scalar(_ENTRY_OWNER, {"key": key})
        if owner is None:
            return None
        if owner != user_id:
            raise Conflict("idempotency_key was already used for another user", param="idempotency_key")
        return await self._read_balance(conn, user_id)

    def _insert_account_if_missing(self, user_id: str, now: int) -> Any:
        values: Mapping[str, object] = {
            "user_id": user_id,
            "balance_micros": 0,
            "reserved_micros": 0,
            "updated_at": now,
        }
        dialect = postgresql if self._db.dialect == "postgresql" else sqlite
        return dialect.insert(ACCOUNTS).values(values).on_conflict_do_nothing(index_elements=["user_id"])

    async def balance(self, user_id: str, *, consistent: bool = False, min_lsn: int = 0) -> BalanceView:
        """A user's balance (zeros without an account).

        By default from a replica. ``consistent=True`` reads the primary; ``min_lsn`` (the
        ``written_lsn`` of an earlier write) reads a replica that has replayed that write, or the
        primary when none has within a few milliseconds, so a caller always sees its own write.
        """
        _require("user_id", user_id, 40)
        if min_lsn > 0 and not consistent:
            caught_up = await self._db.wait_replica_caught_up(min_lsn, timeout=self._replica_wait_s)
            consistent = not caught_up
            METRICS.quota_read_your_writes.labels(target="primary" if consistent else "replica").inc()
        async with self._reading(consistent=consistent) as conn:
            return await self._read_balance(conn, user_id)

    @staticmethod
    async def _read_balance(conn: AsyncConnection, user_id: str) -> BalanceView:
        row = (await conn.execute(_BALANCE, {"uid": user_id})).one_or_none()
        if row is None:
            return BalanceView(user_id, 0, 0)
        return BalanceView(user_id, int(row[0]), int(row[1]))

    # -- reports -------------------------------------------------------------------------------------

    async def list_reservations(
        self, user_id: str, *, state: str = "", limit: int = 50, cursor: str = "", consistent: bool = False
    ) -> ReservationPage:
        """A user's reservations, newest first, ``limit`` per page (at most 500)."""
        _require("user_id", user_id, 40)
        if state and state not in STATES:
            raise InvalidRequest(f"state must be one of {', '.join(STATES)} (got {state!r})", param="state")
        rows_wanted = min(max(limit or 50, 1), MAX_PAGE)
        query = _PAGE
        params: dict[str, object] = {"uid": user_id, "rows": rows_wanted + 1}
        if state:
            query = query.where(_R.state == bindparam("state"))
            params["state"] = state
        if cursor:
            created, _, after = cursor.partition(":")
            if not created.isdigit() or not after:
                raise InvalidRequest("cursor is not one this service returned", param="cursor")
            query = query.where(
                or_(
                    _R.created_at < bindparam("c_at"),
                    and_(_R.created_at == bindparam("c_at"), _R.id < bindparam("c_id")),
                )
            )
            params.update(c_at=int(created), c_id=after)
        async with self._reading(consistent=consistent) as conn:
            rows = (await conn.execute(query, params)).all()
        views = tuple(_reservation_view(row) for row in rows[:rows_wanted])
        more = len(rows) > rows_wanted
        next_cursor = f"{views[-1].created_at}:{views[-1].reservation_id}" if more else ""
        return ReservationPage(views, next_cursor)

    async def reconcile(self, *, consistent: bool = False) -> list[Discrepancy]:
        """Everything the books disagree on (see :mod:`services.quota.reconcile`); empty when right."""
        return await reconcile(self._db, consistent=consistent)


def _reservation_view(row: Any) -> ReservationView:
    usage = row[8] or {}
    return ReservationView(
        reservation_id=str(row[0]),
        user_id=str(row[1]),
        key_id=str(row[2]),
        model=str(row[3]),
        price_id=int(row[4]),
        reserved_micros=int(row[5]),
        state=str(row[6]),
        charged_micros=int(row[7]),
        usage=Usage(
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            cached_prompt_tokens=int(usage.get("cached_prompt_tokens", 0)),
            images=int(usage.get("images", 0)),
            estimated=bool(usage.get("estimated", False)),
            cache_write_tokens=int(usage.get("cache_write_tokens", 0)),
            reasoning_tokens=int(usage.get("reasoning_tokens", 0)),
        ),
        created_at=int(row[9]),
        expires_at=int(row[10]),
        finished_at=int(row[11]),
    )
