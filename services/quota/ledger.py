"""Balances, holds and the append-only ledger: reserve, settle, release, expire, top up, reconcile.

Invariants, at every commit, whatever the concurrency:

* ``accounts.balance_micros >= accounts.reserved_micros >= 0`` (also a CHECK in the schema): a balance
  never goes below zero and never below what is held;
* ``accounts.balance_micros == sum(ledger_entries.amount_micros)`` per user: top-ups are positive,
  adjustments signed, and each settled or expired reservation has exactly one ``charge`` entry
  (its negated charge, possibly 0); a released one has none;
* ``accounts.reserved_micros == sum(reservations.reserved_micros where state = 'held')`` per user.

How each operation keeps them:

* **reserve** holds the worst case with one conditional ``UPDATE ... WHERE balance - reserved >= :r``
  on the primary, in the same transaction as the reservation insert. The row lock serializes
  concurrent holds on one account and the condition is re-checked on the locked row, so N parallel
  requests against a balance worth N-1 holds get exactly N-1 holds. There is no "rich user" shortcut.
* **settle / release / expire** start with the state transition ``UPDATE reservations ... WHERE
  state = 'held'``. Exactly one caller wins it; every other call (a retry, a racing release, another
  quota replica's sweeper) finds the reservation finished and gets the stored outcome with
  ``repeated=True``. The winner then moves money in the same transaction.
* Locks are always taken reservation first, account second (reserve only inserts a new reservation),
  so the operations cannot deadlock each other.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import JSON, Row, Table, bindparam, func, insert, literal, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from services.common.clock import Clock
from services.common.db import Database
from services.common.errors import Conflict, GatewayError, InsufficientQuota, InvalidRequest, NotFound
from services.common.telemetry import METRICS
from services.quota import models
from services.quota.pricing import MAX_IMAGES, MAX_TOKENS, Price, PriceBook, Usage, cost, worst_case

__all__ = [
    "EXPIRED",
    "HELD",
    "RELEASED",
    "SETTLED",
    "BalanceView",
    "Discrepancy",
    "Hold",
    "Ledger",
    "Outcome",
]

log = logging.getLogger(__name__)

HELD = "held"
SETTLED = "settled"
RELEASED = "released"
EXPIRED = "expired"

# Ledger entry flags.
FLAG_CAPPED = "capped"
FLAG_OVERAGE = "overage"
FLAG_ESTIMATED = "estimated"
FLAG_EXPIRED = "expired"

# Keeps a balance far below 2**63 micro-units whatever is added.
MAX_TOP_UP_MICROS = 10**15

# --- SQL, built once: the request path only binds parameters (building statements costs more than
# running them). Bind names differ from column names, which Core reserves for SET/VALUES.
_A = cast(Table, models.Account.__table__).c
_R = cast(Table, models.Reservation.__table__).c
_L = cast(Table, models.LedgerEntry.__table__).c
_ACCOUNTS = cast(Table, models.Account.__table__)
_RESERVATIONS = cast(Table, models.Reservation.__table__)
_ENTRIES = cast(Table, models.LedgerEntry.__table__)

_BALANCE = select(_A.balance_micros, _A.reserved_micros).where(_A.user_id == bindparam("uid"))
_BALANCE_FOR_UPDATE = _BALANCE.with_for_update()
_HOLD = (
    update(_ACCOUNTS)
    .where(_A.user_id == bindparam("uid"), _A.balance_micros - _A.reserved_micros >= bindparam("amount"))
    .values(reserved_micros=_A.reserved_micros + bindparam("amount"), updated_at=bindparam("now"))
    .returning(_A.balance_micros, _A.reserved_micros)
)
_MOVE_MONEY = (
    update(_ACCOUNTS)
    .where(_A.user_id == bindparam("uid"))
    .values(
        balance_micros=_A.balance_micros - bindparam("charged"),
        reserved_micros=_A.reserved_micros - bindparam("released"),
        updated_at=bindparam("now"),
    )
)
_CREDIT = (
    update(_ACCOUNTS)
    .where(_A.user_id == bindparam("uid"))
    .values(balance_micros=_A.balance_micros + bindparam("amount"), updated_at=bindparam("now"))
    .returning(_A.balance_micros, _A.reserved_micros)
)
# An adjustment down may not uncover what open reservations hold.
_DEBIT = _CREDIT.where(_A.balance_micros + bindparam("amount") >= _A.reserved_micros)

_RESERVATION = select(
    _R.id, _R.user_id, _R.model, _R.state, _R.price_id, _R.reserved_micros, _R.expires_at
).where(_R.id == bindparam("rid"))
_INSERT_RESERVATION = insert(_RESERVATIONS)
# The one statement that decides who finishes a reservation: only a caller that sees it held wins.
_FINISH = (
    update(_RESERVATIONS)
    .where(_R.id == bindparam("rid"), _R.state == HELD)
    .values(state=bindparam("new_state"), finished_at=bindparam("now"))
    .returning(_R.user_id, _R.price_id, _R.reserved_micros)
)
_EXPIRE = (
    update(_RESERVATIONS)
    .where(_R.id == bindparam("rid"), _R.state == HELD, _R.expires_at <= bindparam("cutoff"))
    .values(state=EXPIRED, finished_at=bindparam("cutoff"), charged_micros=_R.reserved_micros)
    .returning(_R.user_id, _R.price_id, _R.reserved_micros)
)
_RECORD_CHARGE = (
    update(_RESERVATIONS)
    .where(_R.id == bindparam("rid"))
    .values(charged_micros=bindparam("charged"), usage=bindparam("usage_json", type_=JSON()))
)
_DUE = (
    select(_R.id)
    .where(_R.state == HELD, _R.expires_at <= bindparam("cutoff"))
    .order_by(_R.expires_at)
    .limit(bindparam("batch"))
)
_STORED_OUTCOME = (
    select(_R.state, _R.charged_micros, _R.reserved_micros, _R.price_id, _L.flags)
    .select_from(_RESERVATIONS.outerjoin(_ENTRIES, _L.reservation_id == _R.id))
    .where(_R.id == bindparam("rid"))
)
_INSERT_ENTRY = insert(_ENTRIES)
_ENTRY_OWNER = select(_L.user_id).where(_L.idempotency_key == bindparam("key"))


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


@dataclass(frozen=True, slots=True)
class BalanceView:
    user_id: str
    balance_micros: int
    reserved_micros: int

    @property
    def available_micros(self) -> int:
        return self.balance_micros - self.reserved_micros


@dataclass(frozen=True, slots=True)
class Discrepancy:
    """A user whose balance disagrees with the ledger, or whose held total disagrees with the holds."""

    user_id: str
    balance_micros: int
    ledger_sum_micros: int
    reserved_micros: int
    held_sum_micros: int


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
    """The accounting operations, each one transaction on the primary (balance reads excepted).

    ``clock`` supplies every timestamp, so expiry is testable without sleeping.
    """

    def __init__(
        self,
        db: Database,
        prices: PriceBook,
        *,
        clock: Clock,
        reservation_ttl_s: int,
        allow_overage: bool = False,
        expiry_batch_size: int = 100,
    ) -> None:
        self._db = db
        self._prices = prices
        self._clock = clock
        self._ttl = reservation_ttl_s
        self._allow_overage = allow_overage
        self._batch = expiry_batch_size

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[AsyncConnection]:
        """One committed transaction on the primary, as its Core connection (every statement here is
        Core; the ORM session's per-statement bookkeeping would only cost time)."""
        async with self._db.transaction() as session:
            yield await session.connection()

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
        key_id: str = "",
    ) -> Hold:
        """Hold the worst-case cost of a request against the user's balance.

        Raises :class:`InsufficientQuota` when ``balance - held`` cannot cover it (a user without an
        account has 0 available), :class:`ModelNotFound` for an unpriced model. Idempotent by
        ``reservation_id``: a repeat returns the existing hold without holding twice, and
        :class:`Conflict` when that id belongs to another request or has already finished.
        """
        _require("reservation_id", reservation_id, 64)
        _require("user_id", user_id, 40)
        _limit_length("key_id", key_id, 40)
        _check_count("prompt_tokens", prompt_tokens, MAX_TOKENS)
        _check_count("max_output_tokens", max_output_tokens, MAX_TOKENS)
        _check_count("images", images, MAX_IMAGES)
        price = await self._prices.current(model)
        amount = worst_case(
            price, prompt_tokens=prompt_tokens, max_output_tokens=max_output_tokens, images=images
        )
        now = int(self._clock.time())
        expires_at = now + self._ttl
        try:
            async with self._transaction() as conn:
                existing = (await conn.execute(_RESERVATION, {"rid": reservation_id})).one_or_none()
                if existing is not None:
                    return await self._repeat_hold(conn, existing, user_id=user_id, model=model)
                balance, reserved = await self._hold(conn, user_id, amount, now)
                await conn.execute(
                    _INSERT_RESERVATION,
                    {
                        "id": reservation_id,
                        "user_id": user_id,
                        "key_id": key_id,
                        "model": model,
                        "price_id": price.price_id,
                        "reserved_micros": amount,
                        "state": HELD,
                        "charged_micros": 0,
                        "usage": {},
                        "created_at": now,
                        "expires_at": expires_at,
                        "finished_at": 0,
                    },
                )
        except IntegrityError:
            # A concurrent reserve with the same id committed first; our hold rolled back with this
            # transaction, so answering with theirs holds exactly once.
            async with self._reading(consistent=True) as conn:
                existing = (await conn.execute(_RESERVATION, {"rid": reservation_id})).one_or_none()
                if existing is None:
                    raise
                return await self._repeat_hold(conn, existing, user_id=user_id, model=model)
        return Hold(
            reservation_id=reservation_id,
            user_id=user_id,
            reserved_micros=amount,
            price=price,
            available_micros=balance - reserved,
            expires_at=expires_at,
        )

    async def _hold(self, conn: AsyncConnection, user_id: str, amount: int, now: int) -> tuple[int, int]:
        """Add ``amount`` to the user's holds if the balance covers it; return (balance, reserved)."""
        if amount == 0:
            # A free request fits in any balance, including a missing account's zero.
            current = await self._read_balance(conn, user_id)
            return current.balance_micros, current.reserved_micros
        row = (await conn.execute(_HOLD, {"uid": user_id, "amount": amount, "now": now})).one_or_none()
        if row is None:
            current = await self._read_balance(conn, user_id)
            METRICS.quota_rejections.labels(reason=InsufficientQuota.code).inc()
            raise InsufficientQuota(
                f"insufficient quota: this request needs {amount} micro-units but only "
                f"{current.available_micros} are available"
            )
        return int(row[0]), int(row[1])

    async def _repeat_hold(
        self, conn: AsyncConnection, existing: Row[*tuple[Any, ...]], *, user_id: str, model: str
    ) -> Hold:
        if existing.user_id != user_id or existing.model != model:
            raise Conflict(
                f"reservation id {existing.id!r} is already used by another request", param="reservation_id"
            )
        if existing.state != HELD:
            # Answering "held" here would let the caller spend upstream money against no hold at all.
            raise Conflict(
                f"reservation {existing.id!r} is already {existing.state}; reserve with a new id",
                param="reservation_id",
            )
        current = await self._read_balance(conn, user_id)
        return Hold(
            reservation_id=existing.id,
            user_id=existing.user_id,
            reserved_micros=existing.reserved_micros,
            price=await self._prices.by_id(existing.price_id),
            available_micros=current.available_micros,
            expires_at=existing.expires_at,
            repeated=True,
        )

    # -- settle, release, expire ----------------------------------------------------------------------

    async def settle(self, reservation_id: str, usage: Usage) -> Outcome:
        """Charge ``usage`` at the reservation's price and return the rest of the hold.

        The charge never exceeds the hold (flag ``capped``) unless overage is allowed, in which case
        it is bounded by what the balance covers beyond the user's other holds (flag ``overage``). An
        estimated usage (flag ``estimated``) is always capped at the hold. A repeat, or a settle that
        lost a race with release or expiry, returns the stored outcome with ``repeated=True``;
        :class:`NotFound` for an unknown id.
        """
        _require("reservation_id", reservation_id, 64)
        usage.validate()
        now = int(self._clock.time())
        async with self._transaction() as conn:
            finish = {"rid": reservation_id, "new_state": SETTLED, "now": now}
            won = (await conn.execute(_FINISH, finish)).one_or_none()
            if won is None:
                return await self._stored_outcome(conn, reservation_id)
            user_id, price_id, reserved = str(won[0]), int(won[1]), int(won[2])
            price = await self._prices.by_id(price_id)
            charged, flags = await self._charge_for(
                conn, user_id, reserved=reserved, full=cost(price, usage), estimated=usage.estimated
            )
            await conn.execute(
                _RECORD_CHARGE, {"rid": reservation_id, "charged": charged, "usage_json": usage.as_json()}
            )
            await self._finish(
                conn, user_id, reservation_id, price_id, charged=charged, reserved=reserved, flags=flags
            )
        METRICS.quota_finished.labels(state=SETTLED).inc()
        return Outcome(reservation_id, SETTLED, charged, reserved, price_id, repeated=False, flags=flags)

    async def _charge_for(
        self, conn: AsyncConnection, user_id: str, *, reserved: int, full: int, estimated: bool
    ) -> tuple[int, tuple[str, ...]]:
        """The amount to charge for a cost of ``full`` against a hold of ``reserved``, and its flags."""
        marks = (FLAG_ESTIMATED,) if estimated else ()
        if full <= reserved:
            return full, marks
        if estimated or not self._allow_overage:
            return reserved, (FLAG_CAPPED, *marks)
        # The account row is locked until commit, so the room computed here is still there at the update.
        row = (await conn.execute(_BALANCE_FOR_UPDATE, {"uid": user_id})).one_or_none()
        # No account: only a free hold (0 reserved) gets here, and nothing can be charged.
        room = 0 if row is None else int(row[0]) - (int(row[1]) - reserved)
        charged = max(reserved, min(full, room))
        flags = ((FLAG_OVERAGE,) if charged > reserved else ()) + ((FLAG_CAPPED,) if charged < full else ())
        return charged, flags

    async def release(self, reservation_id: str, reason: str = "") -> Outcome:
        """Return the whole hold; nothing is charged and no ledger entry is written.

        A repeat, or a release after settle or expiry, changes nothing and returns the stored outcome
        with ``repeated=True``; :class:`NotFound` for an unknown id.
        """
        _require("reservation_id", reservation_id, 64)
        now = int(self._clock.time())
        async with self._transaction() as conn:
            finish = {"rid": reservation_id, "new_state": RELEASED, "now": now}
            won = (await conn.execute(_FINISH, finish)).one_or_none()
            if won is None:
                return await self._stored_outcome(conn, reservation_id)
            user_id, price_id, reserved = str(won[0]), int(won[1]), int(won[2])
            await self._move_money(conn, user_id, charged=0, reserved=reserved, now=now)
        log.debug("reservation released", extra={"reservation_id": reservation_id, "reason": reason[:200]})
        METRICS.quota_finished.labels(state=RELEASED).inc()
        return Outcome(reservation_id, RELEASED, 0, reserved, price_id, repeated=False)

    async def expire_due(self, now: float | None = None) -> int:
        """Settle every hold whose TTL has passed at its reserved amount (state and flag ``expired``).

        Works in batches of ``expiry_batch_size``, one transaction per reservation, so a long backlog
        never holds locks for long. Safe to run in several quota processes at once: the conditional
        transition decides which one charges. Returns how many this call expired.
        """
        cutoff = int(self._clock.time() if now is None else now)
        expired = 0
        while True:
            async with self._reading(consistent=True) as conn:
                due = (await conn.scalars(_DUE, {"cutoff": cutoff, "batch": self._batch})).all()
            for reservation_id in due:
                expired += await self._expire_one(reservation_id, cutoff)
            if len(due) < self._batch:
                break
        if expired:
            log.info("expired reservations settled at their reserved amount", extra={"count": expired})
        return expired

    async def _expire_one(self, reservation_id: str, cutoff: int) -> int:
        async with self._transaction() as conn:
            won = (await conn.execute(_EXPIRE, {"rid": reservation_id, "cutoff": cutoff})).one_or_none()
            if won is None:
                return 0
            user_id, price_id, reserved = str(won[0]), int(won[1]), int(won[2])
            await self._finish(
                conn,
                user_id,
                reservation_id,
                price_id,
                charged=reserved,
                reserved=reserved,
                flags=(FLAG_EXPIRED,),
            )
        METRICS.quota_finished.labels(state=EXPIRED).inc()
        return 1

    async def _finish(
        self,
        conn: AsyncConnection,
        user_id: str,
        reservation_id: str,
        price_id: int,
        *,
        charged: int,
        reserved: int,
        flags: tuple[str, ...],
    ) -> None:
        """Charge ``charged``, drop the hold of ``reserved``, and write the one charge entry."""
        now = int(self._clock.time())
        await self._move_money(conn, user_id, charged=charged, reserved=reserved, now=now)
        await conn.execute(
            _INSERT_ENTRY,
            {
                "user_id": user_id,
                "kind": "charge",
                "amount_micros": -charged,
                "reservation_id": reservation_id,
                "price_id": price_id,
                "idempotency_key": None,
                "actor": "",
                "reason": "",
                "flags": ",".join(flags),
                "created_at": now,
            },
        )

    async def _move_money(
        self, conn: AsyncConnection, user_id: str, *, charged: int, reserved: int, now: int
    ) -> None:
        if charged == 0 and reserved == 0:
            # Free requests hold nothing, and their user may have no account at all.
            return
        result = await conn.execute(
            _MOVE_MONEY, {"uid": user_id, "charged": charged, "released": reserved, "now": now}
        )
        if getattr(result, "rowcount", 0) != 1:
            raise GatewayError(f"account {user_id!r} of a held reservation is missing")

    async def _stored_outcome(self, conn: AsyncConnection, reservation_id: str) -> Outcome:
        row = (await conn.execute(_STORED_OUTCOME, {"rid": reservation_id})).one_or_none()
        if row is None:
            raise NotFound(f"reservation {reservation_id!r} does not exist", param="reservation_id")
        state, charged, reserved, price_id, flags = row
        if state == HELD:
            # Only reachable when the reserve that created it has not committed yet.
            raise Conflict(f"reservation {reservation_id!r} is still being reserved; retry")
        return Outcome(
            reservation_id,
            str(state),
            int(charged),
            int(reserved),
            int(price_id),
            repeated=True,
            flags=tuple(flag for flag in (flags or "").split(",") if flag),
        )

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
        for another user).
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
        now = int(self._clock.time())
        try:
            async with self._transaction() as conn:
                if key is not None and (repeat := await self._topup_repeat(conn, key, user_id)):
                    return repeat
                await conn.execute(self._insert_account_if_missing(user_id, now))
                change = _CREDIT if amount_micros > 0 else _DEBIT
                params = {"uid": user_id, "amount": amount_micros, "now": now}
                row = (await conn.execute(change, params)).one_or_none()
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
        except IntegrityError:
            # The same key committed concurrently; this attempt rolled back entirely.
            if key is None:
                raise
            async with self._reading(consistent=True) as conn:
                repeat = await self._topup_repeat(conn, key, user_id)
            if repeat is None:
                raise
            return repeat

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
        return dialect.insert(_ACCOUNTS).values(values).on_conflict_do_nothing(index_elements=["user_id"])

    async def balance(self, user_id: str, *, consistent: bool = False) -> BalanceView:
        """A user's balance (zeros without an account), from a replica unless ``consistent``.

        Use ``consistent=True`` to see your own recent write: a replica may still be replaying it.
        """
        _require("user_id", user_id, 40)
        async with self._reading(consistent=consistent) as conn:
            return await self._read_balance(conn, user_id)

    @staticmethod
    async def _read_balance(conn: AsyncConnection, user_id: str) -> BalanceView:
        row = (await conn.execute(_BALANCE, {"uid": user_id})).one_or_none()
        if row is None:
            return BalanceView(user_id, 0, 0)
        return BalanceView(user_id, int(row[0]), int(row[1]))

    async def reconcile(self, *, consistent: bool = False) -> list[Discrepancy]:
        """Every user whose balance differs from the sum of their ledger entries, or whose held total
        differs from the sum of their held reservations. Empty when the books are right.

        Reading a replica is fine: its snapshot is an older commit, and the invariants hold at every
        commit. ``consistent=True`` checks the newest state on the primary.
        """
        sums = (
            select(_L.user_id.label("user_id"), func.sum(_L.amount_micros).label("total"))
            .group_by(_L.user_id)
            .subquery()
        )
        held = (
            select(_R.user_id.label("user_id"), func.sum(_R.reserved_micros).label("total"))
            .where(_R.state == HELD)
            .group_by(_R.user_id)
            .subquery()
        )
        ledger_total = func.coalesce(sums.c.total, 0)
        held_total = func.coalesce(held.c.total, 0)
        accounts = (
            select(
                _A.user_id,
                _A.balance_micros,
                ledger_total,
                _A.reserved_micros,
                held_total,
            )
            .outerjoin(sums, sums.c.user_id == _A.user_id)
            .outerjoin(held, held.c.user_id == _A.user_id)
            .where((_A.balance_micros != ledger_total) | (_A.reserved_micros != held_total))
        )
        # Ledger entries of a user without an account must sum to zero (only free requests do that).
        orphans = (
            select(sums.c.user_id, literal(0), sums.c.total, literal(0), literal(0))
            .outerjoin(_ACCOUNTS, _A.user_id == sums.c.user_id)
            .where(_A.user_id.is_(None), sums.c.total != 0)
        )
        async with self._reading(consistent=consistent) as conn:
            rows = (await conn.execute(accounts.union_all(orphans))).all()
        return sorted(
            (Discrepancy(str(r[0]), int(r[1]), int(r[2]), int(r[3]), int(r[4])) for r in rows),
            key=lambda d: d.user_id,
        )
