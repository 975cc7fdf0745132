"""Leases on the primary: quota's credit books (:mod:`services.quota.credit`) run on stored rows.

Each operation is one transaction: lock the rows it touches, load them into a
:class:`~services.quota.credit.CreditBooks`, run the operation there, and write back what changed
(holds upserted, accounts and budget windows as absolute values under their locks). The rules live
only in the books; this module is the SQL around them.

A lease is a ``reservations`` row of kind ``lease`` (``services.quota.models.Reservation``); each
request charged on it is one ``ledger_entries`` row whose ``reservation_id`` is the request id (unique,
so a request is charged once whatever repeats) and whose ``hold_id`` is the lease. A user-scope lease
(shared by the user's keys without a budget of their own) has an empty ``key_id`` and holds on the
user's windows only (its ``budget_windows`` bits name no key window), so reconcile and expiry treat it
like any other lease; its requests' ledger rows and logs carry their own key ids.

Which keys have budgets of their own is read from the budget table: in the sync's transaction for the
key that asks a user-scope lease (the authoritative check), and for the relays' copy of the list
(:class:`~services.common.credit.BudgetedKeys`) at most every half sync interval per quota process,
sent only to a relay whose copy is out of date.

Locks are taken in the order of :mod:`services.quota.book_locks`, shared with the exact path: holds
(by id), then accounts (by user id), then budget windows (by key), each set in one
``SELECT ... FOR UPDATE ORDER BY``, so syncs, charges, expiry, recalls and the exact path's batches
cannot deadlock each other, in any number of quota processes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import ARRAY, Select, String, and_, bindparam, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from services.common.clock import Clock
from services.common.credit import (
    KEY_SCOPE,
    LEASE,
    RESERVATION,
    USER_SCOPE,
    BudgetedKeys,
    Charge,
    CreditTerms,
    LeaseAsk,
    LeaseReport,
    ReserveAsk,
    SyncAnswer,
    SyncRequest,
)
from services.common.db import Database
from services.common.errors import InvalidRequest
from services.quota import models
from services.quota.book_locks import BookLocks, member_of, window_row
from services.quota.budgets import Calendar, WindowKey, window_bit
from services.quota.credit import (
    CLOSED,
    CLOSING,
    EXPIRED,
    OPEN,
    Account,
    CreditBooks,
    Hold,
    Posted,
    Window,
)
from services.quota.holding import HoldRequest, budget_windows, windows_for
from services.quota.models import ACCOUNTS, BUDGETS, ENTRIES, RESERVATIONS, USAGE
from services.quota.settlement import windows_of

__all__ = ["MAX_BUDGETED_KEYS", "MAX_ITEMS", "CreditStore", "budgeted_keys"]

log = logging.getLogger(__name__)

# Reports or asks in one sync: a relay process holds one lease per scope it serves (a budgeted key, or
# a user whose keys share one).
MAX_ITEMS = 10_000
MAX_AMOUNT_MICROS = 10**15
# Budgeted keys sent to relays at most: about 2 MB of key ids in one answer. Past it every key keeps a
# lease of its own (the list is incomplete), which costs quota more syncs but bypasses no budget.
MAX_BUDGETED_KEYS = 50_000
# Two transactions inserting the same new row (a request's charge against an unknown hold, a lease
# asked again while its first ask is in flight) race on its unique id; the loser is retried and then
# finds the winner's row.
_ATTEMPTS = 3

_T = TypeVar("_T")

_A = ACCOUNTS.c
_R = RESERVATIONS.c
_L = ENTRIES.c
_B = BUDGETS.c
_U = USAGE.c

_HOLD_COLUMNS = (
    _R.id,
    _R.kind,
    _R.key_id,
    _R.user_id,
    _R.state,
    _R.reserved_micros,
    _R.relay_id,
    _R.granted_micros,
    _R.applied_micros,
    _R.over_micros,
    _R.used_reported_micros,
    _R.inflight_reported_micros,
    _R.seq,
    _R.recall,
    _R.phase,
    _R.given_up,
    _R.expires_at,
    _R.expires_at_ms,
    _R.budget_windows,
    _R.day_start,
    _R.month_start,
)


def _window_id(key: WindowKey) -> str:
    return f"{key.scope}:{key.scope_id}:{key.period}:{key.window_start}"


@dataclass(slots=True)
class _Loaded:
    """One transaction's rows as loaded, to write back only what the books changed."""

    books: CreditBooks
    holds: dict[str, Hold]
    accounts: dict[str, tuple[int, int]]
    windows: dict[str, tuple[int, int, int]]
    window_keys: dict[str, WindowKey]


class CreditStore:
    """Leases and lease charges on the primary (see the module docstring)."""

    def __init__(self, db: Database, calendar: Calendar, terms: CreditTerms, clock: Clock) -> None:
        self._db = db
        self._calendar = calendar
        self._terms = terms
        self._clock = clock
        pg = db.dialect == "postgresql"
        self._pg = pg
        self._locks = BookLocks(postgres=pg)
        self._users_of = select(_R.user_id).where(member_of(_R.id, "ids", postgres=pg)).distinct()
        active_leases = and_(
            member_of(_R.user_id, "users", postgres=pg), _R.kind == models.LEASE, _R.state == models.HELD
        )
        self._lock_named = (
            select(*_HOLD_COLUMNS)
            .where(member_of(_R.id, "ids", postgres=pg))
            .order_by(_R.id)
            .with_for_update()
        )
        self._lock_named_and_leases = (
            select(*_HOLD_COLUMNS)
            .where(or_(member_of(_R.id, "ids", postgres=pg), active_leases))
            .order_by(_R.id)
            .with_for_update()
        )
        self._lock_leases_of = select(*_HOLD_COLUMNS).where(active_leases).order_by(_R.id).with_for_update()
        self._due = (
            select(_R.id)
            .where(
                _R.kind == models.LEASE,
                _R.state == models.HELD,
                _R.expires_at_ms <= bindparam("now_ms"),
            )
            .order_by(_R.expires_at_ms)
            .limit(bindparam("batch"))
        )
        self._charged_already: Select[tuple[str | None]]
        if pg:
            # A join on the unnested ids probes the unique index once per request; ``= ANY(array)``
            # is planned as a scan of the whole ledger, which grows by a row per request.
            rids = (
                func.unnest(bindparam("rids", type_=ARRAY(String())))
                .table_valued("rid")
                .render_derived("asked")
            )
            self._charged_already = select(_L.reservation_id).select_from(
                rids.join(ENTRIES, _L.reservation_id == rids.c.rid)
            )
        else:
            self._charged_already = select(_L.reservation_id).where(
                member_of(_L.reservation_id, "rids", postgres=False)
            )
        self._insert_holds = insert(RESERVATIONS)
        self._update_holds = (
            update(RESERVATIONS)
            .where(_R.id == bindparam("h_id"))
            .values(
                state=bindparam("h_state"),
                reserved_micros=bindparam("h_reserved"),
                charged_micros=bindparam("h_charged"),
                granted_micros=bindparam("h_granted"),
                applied_micros=bindparam("h_applied"),
                over_micros=bindparam("h_over"),
                used_reported_micros=bindparam("h_used"),
                inflight_reported_micros=bindparam("h_inflight"),
                seq=bindparam("h_seq"),
                recall=bindparam("h_recall"),
                phase=bindparam("h_phase"),
                given_up=bindparam("h_given_up"),
                expires_at=bindparam("h_expires"),
                expires_at_ms=bindparam("h_expires_ms"),
                finished_at=bindparam("h_finished"),
            )
        )
        self._update_accounts = (
            update(ACCOUNTS)
            .where(_A.user_id == bindparam("a_uid"))
            .values(
                balance_micros=bindparam("a_balance"),
                reserved_micros=bindparam("a_held"),
                updated_at=bindparam("a_now"),
            )
        )
        self._update_windows = (
            update(USAGE)
            .where(
                _U.scope == bindparam("w_scope"),
                _U.scope_id == bindparam("w_sid"),
                _U.period == bindparam("w_period"),
                _U.window_start == bindparam("w_start"),
            )
            .values(
                spent_micros=bindparam("w_spent"),
                reserved_micros=bindparam("w_held"),
                limit_micros=bindparam("w_cap"),
                updated_at=bindparam("w_now"),
            )
        )
        self._insert_entries = insert(ENTRIES)
        self._budgeted_ids = (
            select(_B.scope_id)
            .where(_B.scope == "key")
            .distinct()
            .order_by(_B.scope_id)
            .limit(MAX_BUDGETED_KEYS + 1)
        )
        # This process's copy of the budgeted keys and when it was read (clock seconds): relays ask
        # for it every sync, the budget table changes rarely.
        self._budgeted: BudgetedKeys | None = None
        self._budgeted_read_at = -math.inf

    @property
    def terms(self) -> CreditTerms:
        return self._terms

    def _now_ms(self) -> int:
        return int(self._clock.time() * 1000)

    # --- the relay's sync ------------------------------------------------------------------------

    async def sync(self, request: SyncRequest) -> SyncAnswer:
        """Apply one relay sync: its reports, then its asks, in one transaction on the primary.

        A new lease holds against the budget windows of its key and user (``budgets``, read in the
        same transaction). Raises :class:`InvalidRequest` for a malformed request.
        """
        _check_sync(request)
        # Read first: a failure to read it fails the sync before its transaction commits anything.
        current = await self._budgeted_keys()
        answer = SyncAnswer()
        if request.reports or request.asks:
            answer = await _retrying_races(lambda: self._sync(request))
        if current.version != request.budgeted_version:
            answer = dataclasses.replace(answer, budgeted=current)
        return answer

    async def _budgeted_keys(self) -> BudgetedKeys:
        """The keys with budgets of their own, read again once half a sync interval old."""
        now = self._clock.time()
        if self._budgeted is None or now - self._budgeted_read_at >= self._terms.sync_interval_ms / 2000:
            async with self._db.reader(consistent=True) as session:
                ids = [str(i) for i in await session.scalars(self._budgeted_ids)]
            self._budgeted = budgeted_keys(ids)
            self._budgeted_read_at = now
        return self._budgeted

    async def _sync(self, request: SyncRequest) -> SyncAnswer:
        now_ms = self._now_ms()
        ids = sorted({r.lease_id for r in request.reports} | {a.lease_id for a in request.asks})
        async with self._db.primary.begin() as conn:
            # A hold's user never changes, so who to lock can be read without a lock.
            users = {str(u) for u in await conn.scalars(self._users_of, {"ids": ids})}
            users |= {a.user_id for a in request.asks}
            rows = list(await conn.execute(self._lock_named_and_leases, {"ids": ids, "users": sorted(users)}))
            known = {str(row.id) for row in rows}
            fresh = [ask for ask in request.asks if ask.lease_id not in known]
            ask_windows = await self._ask_windows(conn, fresh, now_ms)
            loaded = await self._load(conn, rows, users, ask_windows.values(), now_ms)
            windows_by_holder = {
                holder: tuple(_window_id(k) for k, _ in found) for holder, found in ask_windows.items()
            }
            loaded.books.windows_of = lambda key_id, user_id: windows_by_holder.get((key_id, user_id), ())
            answer = loaded.books.sync(request, now_ms)
            await self._write(conn, loaded, now_ms)
        _log_turns(loaded, f"sync {request.seq} of relay {request.relay_id}")
        return answer

    async def _ask_windows(
        self, conn: AsyncConnection, asks: Sequence[LeaseAsk], now_ms: int
    ) -> dict[tuple[str, str], list[tuple[WindowKey, int]]]:
        """The budget windows (with their caps) of each new ask's key, as a Reserve of the same key
        would hold against, by (key id, user id); for a user-scope ask also the user's own windows
        (key id empty), what the shared lease holds against when the key has none of its own."""
        if not asks:
            return {}
        sids = sorted({a.user_id for a in asks} | {a.key_id for a in asks if a.key_id})
        stored = {
            (str(r[0]), str(r[1]), str(r[2])): int(r[3])
            for r in await conn.execute(self._locks.stored_budgets, {"sids": sids})
        }
        starts = self._calendar.windows(now_ms / 1000)
        holders = {(a.key_id, a.user_id) for a in asks}
        holders |= {("", a.user_id) for a in asks if a.scope == USER_SCOPE}
        return {
            (key_id, user_id): windows_for(key_id, user_id, starts, stored)
            for key_id, user_id in sorted(holders)
        }

    # --- charges from the usage stream -----------------------------------------------------------

    async def charge(self, charges: Sequence[Charge]) -> list[Posted]:
        """Put a batch of usage-event charges on the books in one transaction.

        Returns what this call posted, in order. Left out: a request already charged (by an earlier
        batch, another consumer, or earlier in this batch: a repeat changes nothing), a charge whose
        hold is an exact-path reservation (the ledger settles it: ``Ledger.settle_charged``), and a
        zero cost (nothing to charge).
        """
        for charge in charges:
            _check_charge(charge)
        if not charges:
            return []
        return await _retrying_races(lambda: self._charge(charges))

    async def _charge(self, charges: Sequence[Charge]) -> list[Posted]:
        now_ms = self._now_ms()
        hold_ids = sorted({c.hold_id for c in charges})
        async with self._db.primary.begin() as conn:
            rows = list(await conn.execute(self._lock_named, {"ids": hold_ids}))
            exact = {str(row.id) for row in rows if row.kind != models.LEASE}
            # A zero cost changes nothing on the books (and leaves no trace to make a repeat one).
            wanted = [c for c in charges if c.hold_id not in exact and c.cost_micros > 0]
            # Read after the holds' locks: a concurrent batch with the same requests has committed.
            done = {
                str(rid)
                for rid in await conn.scalars(
                    self._charged_already, {"rids": sorted({c.request_id for c in wanted})}
                )
            }
            wanted = [c for c in wanted if c.request_id not in done]
            if not wanted:
                return []
            leases = [row for row in rows if row.kind == models.LEASE]
            known = {str(row.id): row for row in leases}
            users = {str(known[c.hold_id].user_id) if c.hold_id in known else c.user_id for c in wanted}
            loaded = await self._load(conn, leases, users, (), now_ms)
            posted: list[Posted] = []
            seen: set[str] = set()
            for charge in wanted:
                if charge.request_id in seen:
                    continue
                seen.add(charge.request_id)
                posted.append(loaded.books.charge(charge))
            await self._write(conn, loaded, now_ms, posted)
        _log_turns(loaded, "charges from the usage stream")
        return posted

    # --- expiry ----------------------------------------------------------------------------------

    async def expire_due(self, batch: int = 500) -> int:
        """Close what is due of leases whose relay stopped syncing (``CreditBooks.expire``), ``batch``
        leases per transaction; returns how many leases changed. Safe in several processes at once."""
        now_ms = self._now_ms()
        changed = 0
        while True:
            async with self._db.reader(consistent=True) as session:
                due = [str(i) for i in await session.scalars(self._due, {"now_ms": now_ms, "batch": batch})]
            if not due:
                break
            async with self._db.primary.begin() as conn:
                rows = list(await conn.execute(self._lock_named, {"ids": sorted(due)}))
                loaded = await self._load(conn, rows, {str(r.user_id) for r in rows}, (), now_ms)
                expired = len(loaded.books.expire(now_ms))
                await self._write(conn, loaded, now_ms)
            _log_turns(loaded, "expiry: no sync of its relay renewed it")
            changed += expired
            # Nothing expired: the due rows were closed meanwhile (or by another quota process).
            if len(due) < batch or not expired:
                break
        if changed:
            log.info("leases expired", extra={"count": changed})
        return changed

    # --- recall, for the exact path --------------------------------------------------------------

    async def recall(self, request: HoldRequest) -> float | None:
        """A Reserve of ``request`` was refused for its balance or a budget: recall the user's open
        leases when their unused credit would cover it (``CreditBooks.reserve``).

        Returns how many seconds to wait before retrying the Reserve (the leases' relays give the
        credit back at their next sync), or None when the refusal stands (no lease of the user, or
        not even their unused credit would cover it).
        """
        now_ms = self._now_ms()
        async with self._db.primary.begin() as conn:
            rows = list(await conn.execute(self._lock_leases_of, {"users": [request.user_id]}))
            if not rows:
                return None
            sids = sorted({request.user_id} | ({request.key_id} if request.key_id else set()))
            stored = {
                (str(r[0]), str(r[1]), str(r[2])): int(r[3])
                for r in await conn.execute(self._locks.stored_budgets, {"sids": sids})
            }
            windows = budget_windows(request, stored)
            loaded = await self._load(conn, rows, {request.user_id}, [windows], now_ms)
            wanted = tuple(_window_id(key) for key, _ in windows)
            loaded.books.windows_of = lambda _key, _user: wanted
            answer = loaded.books.reserve(
                ReserveAsk(request.reservation_id, request.key_id, request.user_id, request.amount), now_ms
            )
            if answer.state == "held":
                # Leases closed since the refusal: the room is there now.
                return 0.0
            if answer.state != "retry":
                return None
            # Only the recall flags are written: the hold itself is the exact path's to take.
            await self._write(conn, loaded, now_ms, holds_only=True)
        _log_turns(loaded, f"reservation {request.reservation_id} of {request.amount} refused")
        return answer.retry_after_ms / 1000

    # --- loading and writing back ----------------------------------------------------------------

    async def _load(
        self,
        conn: AsyncConnection,
        rows: Sequence[Any],
        users: Iterable[str],
        new_windows: Iterable[Sequence[tuple[WindowKey, int]]],
        now_ms: int,
    ) -> _Loaded:
        """Lock the accounts, then the budget windows (creating the new ones), and build the books."""
        holds = {str(row.id): _hold_of(row) for row in rows}
        users = sorted(set(users) | {h.user_id for h in holds.values()})
        accounts: dict[str, tuple[int, int]] = {}
        if users:
            accounts = {
                str(r[0]): (int(r[1]), int(r[2]))
                for r in await conn.execute(self._locks.lock_accounts, {"users": users})
            }
        keys: dict[str, WindowKey] = {}
        for row in rows:
            for key in windows_of(row):
                keys[_window_id(key)] = key
        caps: dict[str, int] = {}
        for found in new_windows:
            for key, cap in found:
                keys[_window_id(key)] = key
                caps[_window_id(key)] = cap
        windows: dict[str, tuple[int, int, int]] = {}
        if keys:
            created = sorted(keys[wid] for wid in caps)
            if created:
                now_s = now_ms // 1000
                await conn.execute(self._locks.new_windows, [window_row(key, now_s) for key in created])
            params = {
                "sids": sorted({k.scope_id for k in keys.values()}),
                "starts": sorted({k.window_start for k in keys.values()}),
            }
            for r in await conn.execute(self._locks.lock_windows, params):
                wid = _window_id(WindowKey(str(r[0]), str(r[1]), str(r[2]), int(r[3])))
                if wid in keys:
                    windows[wid] = (int(r[4]), int(r[5]), int(r[6]))
        books = CreditBooks(
            terms=self._terms,
            windows_of=_no_windows,
            accounts={user: Account(balance, held) for user, (balance, held) in accounts.items()},
            windows={
                wid: Window(cap=caps.get(wid, cap), spent=spent, held=held)
                for wid, (spent, held, cap) in windows.items()
            },
            holds={hold_id: dataclasses.replace(hold) for hold_id, hold in holds.items()},
        )
        return _Loaded(books, holds, accounts, windows, keys)

    async def _write(
        self,
        conn: AsyncConnection,
        loaded: _Loaded,
        now_ms: int,
        posted: Sequence[Posted] = (),
        *,
        holds_only: bool = False,
    ) -> None:
        books = loaded.books
        now_s = now_ms // 1000
        new_rows: list[dict[str, Any]] = []
        changed_rows: list[dict[str, Any]] = []
        for hold_id, hold in books.holds.items():
            if hold.kind != LEASE:
                continue  # an exact reservation is written by the exact path only
            before = loaded.holds.get(hold_id)
            if before is None:
                new_rows.append(self._lease_row(hold, loaded.window_keys, now_s))
            elif hold != before:
                changed_rows.append(_hold_update(hold, now_s))
        if new_rows:
            await conn.execute(self._insert_holds, new_rows)
        if changed_rows:
            await conn.execute(self._update_holds, changed_rows)
        if holds_only:
            return
        accounts = [
            {"a_uid": user, "a_balance": account.balance, "a_held": account.held, "a_now": now_s}
            for user, account in sorted(books.accounts.items())
            if user in loaded.accounts and loaded.accounts[user] != (account.balance, account.held)
        ]
        if accounts:
            await conn.execute(self._update_accounts, accounts)
        windows = []
        for wid, window in sorted(books.windows.items()):
            if wid not in loaded.windows:
                continue
            spent, held, cap = loaded.windows[wid]
            if (spent, held, cap) == (window.spent, window.held, window.cap):
                continue
            key = loaded.window_keys[wid]
            windows.append(
                {
                    "w_scope": key.scope,
                    "w_sid": key.scope_id,
                    "w_period": key.period,
                    "w_start": key.window_start,
                    "w_spent": window.spent,
                    "w_held": window.held,
                    "w_cap": window.cap,
                    "w_now": now_s,
                }
            )
        if windows:
            await conn.execute(self._update_windows, windows)
        # In request id order, so two batches racing on the same requests wait on each other's
        # unique keys in one order and cannot deadlock.
        entries = [_entry(p, now_s) for p in sorted(posted, key=lambda p: p.request_id)]
        if entries:
            await conn.execute(self._insert_entries, entries)

    def _lease_row(self, hold: Hold, keys: Mapping[str, WindowKey], now_s: int) -> dict[str, Any]:
        bits = 0
        day_start = month_start = 0
        for wid in hold.windows:
            key = keys[wid]
            bits |= window_bit(key.scope, key.period)
            if key.period == "day":
                day_start = key.window_start
            else:
                month_start = key.window_start
        row = {
            "id": hold.hold_id,
            "kind": LEASE,
            "user_id": hold.user_id,
            "key_id": hold.key_id,
            "model": "",
            "price_id": 0,
            "usage": {},
            "created_at": now_s,
            "budget_windows": bits,
            "day_start": day_start,
            "month_start": month_start,
            "leases": 0,
            "relay_id": hold.relay_id,
        }
        update_values = _hold_update(hold, now_s)
        row.update(
            state=update_values["h_state"],
            reserved_micros=update_values["h_reserved"],
            charged_micros=update_values["h_charged"],
            granted_micros=hold.granted,
            applied_micros=hold.applied,
            over_micros=hold.over,
            used_reported_micros=hold.used_reported,
            inflight_reported_micros=hold.inflight_reported,
            seq=hold.seq,
            recall=hold.recall,
            phase=hold.state,
            given_up=hold.expired,
            expires_at=update_values["h_expires"],
            expires_at_ms=hold.expires_at,
            finished_at=update_values["h_finished"],
        )
        return row


async def _retrying_races(attempt: Callable[[], Awaitable[_T]]) -> _T:
    for remaining in range(_ATTEMPTS - 1, -1, -1):
        try:
            return await attempt()
        except IntegrityError:
            if not remaining:
                raise
            log.info("a concurrent transaction inserted the same row first; retrying")
    raise AssertionError("unreachable")


def _turn(before: Hold | None, hold: Hold) -> str:
    """How a lease changed in one transaction, in words; empty when it did not turn (a lease's size
    changes at most syncs: that is no turn)."""
    if before is None:
        return "granted"
    if hold.recall and not before.recall:
        return "recalled"
    if hold.state == before.state:
        return ""
    if hold.state == CLOSING:
        return "closing: its relay gave it back"
    if hold.state == EXPIRED:
        return "given up: its relay stopped syncing (reported use stays held for the horizon)"
    if before.state == EXPIRED:
        return "closed: expired, its reported use charged or its horizon over"
    if hold.expired:
        return "given up and closed: its relay stopped syncing, nothing it reported is unpaid"
    return "closed: released by its relay, its reported use charged"


def _log_turns(loaded: _Loaded, why: str) -> None:
    """One line per lease that turned in a committed transaction, and what the transaction was:
    leases turn a handful of times in their lives, never per request."""
    for hold_id, hold in loaded.books.holds.items():
        if hold.kind != LEASE or not (turn := _turn(loaded.holds.get(hold_id), hold)):
            continue
        log.info(
            "credit lease %s",
            turn,
            extra={
                "why": why,
                "lease_id": hold_id,
                "user_id": hold.user_id,
                "key_id": hold.key_id,
                "relay_id": hold.relay_id,
                "granted": hold.granted,
                "applied": hold.applied,
                "used_reported": hold.used_reported,
                "inflight_reported": hold.inflight_reported,
            },
        )


def _no_windows(_key_id: str, _user_id: str) -> tuple[str, ...]:
    return ()


def budgeted_keys(ids: Sequence[str]) -> BudgetedKeys:
    """The relays' copy of the budgeted keys ``ids`` (sorted, at most ``MAX_BUDGETED_KEYS + 1`` read):
    its version is a digest of the list, so every relay holding the same list holds the same version
    whichever quota process answered it."""
    complete = len(ids) <= MAX_BUDGETED_KEYS
    kept = ids[:MAX_BUDGETED_KEYS]
    digest = hashlib.blake2b("\n".join(kept).encode(), digest_size=12).hexdigest()
    return BudgetedKeys(
        version=f"{len(kept)}.{digest}" + ("" if complete else "+"),
        key_ids=frozenset(kept),
        complete=complete,
    )


def _hold_of(row: Any) -> Hold:
    windows = tuple(_window_id(key) for key in windows_of(row))
    if row.kind != models.LEASE:
        # Loaded only to be recognised and left alone (a relay naming an exact reservation).
        return Hold(
            hold_id=str(row.id),
            kind=RESERVATION,
            key_id=str(row.key_id),
            user_id=str(row.user_id),
            windows=windows,
            expires_at=int(row.expires_at) * 1000,
            state=OPEN if row.state == models.HELD else CLOSED,
            granted=int(row.reserved_micros),
        )
    return Hold(
        hold_id=str(row.id),
        kind=LEASE,
        key_id=str(row.key_id),
        user_id=str(row.user_id),
        windows=windows,
        expires_at=int(row.expires_at_ms),
        relay_id=str(row.relay_id),
        state=str(row.phase) if row.state == models.HELD else CLOSED,
        granted=int(row.granted_micros),
        applied=int(row.applied_micros),
        over=int(row.over_micros),
        used_reported=int(row.used_reported_micros),
        inflight_reported=int(row.inflight_reported_micros),
        seq=int(row.seq),
        recall=bool(row.recall),
        expired=bool(row.given_up),
    )


def _hold_update(hold: Hold, now_s: int) -> dict[str, Any]:
    closed = hold.state == CLOSED
    # A closed lease ends expired when quota gave it up, settled when its relay closed it.
    state = models.HELD if not closed else models.EXPIRED if hold.expired else models.SETTLED
    return {
        "h_id": hold.hold_id,
        "h_state": state,
        "h_reserved": hold.granted - hold.applied,
        "h_charged": hold.applied + hold.over,
        "h_granted": hold.granted,
        "h_applied": hold.applied,
        "h_over": hold.over,
        "h_used": hold.used_reported,
        "h_inflight": hold.inflight_reported,
        "h_seq": hold.seq,
        "h_recall": hold.recall,
        "h_phase": hold.state,
        "h_given_up": hold.expired,
        "h_expires": math.ceil(hold.expires_at / 1000),
        "h_expires_ms": hold.expires_at,
        "h_finished": now_s if closed else 0,
    }


def _entry(posted: Posted, now_s: int) -> dict[str, Any]:
    flags = []
    if posted.late:
        flags.append("late")
    if posted.beyond_hold:
        flags.append("beyond_hold")
    if posted.written_off:
        flags.append("written_off")
    return {
        "user_id": posted.user_id,
        "kind": "charge",
        "amount_micros": -posted.charged,
        "reservation_id": posted.request_id,
        "hold_id": posted.hold_id,
        "price_id": None,
        "idempotency_key": None,
        "actor": "",
        "reason": "",
        "flags": ",".join(flags),
        "created_at": now_s,
        "written_off_micros": posted.written_off,
    }


def _require_id(name: str, value: str, max_len: int) -> None:
    if not value or len(value) > max_len:
        raise InvalidRequest(f"{name} is required (at most {max_len} characters)", param=name)


def _check_amount(name: str, value: int) -> None:
    if not 0 <= value <= MAX_AMOUNT_MICROS:
        raise InvalidRequest(f"{name} must be between 0 and {MAX_AMOUNT_MICROS} (got {value})", param=name)


def _check_sync(request: SyncRequest) -> None:
    _require_id("relay_id", request.relay_id, 64)
    if request.seq < 0:
        raise InvalidRequest(f"seq must not be negative (got {request.seq})", param="seq")
    if len(request.reports) > MAX_ITEMS or len(request.asks) > MAX_ITEMS:
        raise InvalidRequest(
            f"a sync carries at most {MAX_ITEMS} reports and {MAX_ITEMS} asks", param="reports"
        )
    for report in request.reports:
        _check_report(report)
    if len(request.budgeted_version) > 64:
        raise InvalidRequest("budgeted_version is longer than 64 characters", param="budgeted_version")
    for ask in request.asks:
        _require_id("asks.lease_id", ask.lease_id, 64)
        _require_id("asks.user_id", ask.user_id, 40)
        if ask.scope not in (KEY_SCOPE, USER_SCOPE):
            raise InvalidRequest(f"asks.scope must be key or user (got {ask.scope!r})", param="asks.scope")
        if ask.scope == USER_SCOPE:
            # The asking key is what quota checks for a budget of its own.
            _require_id("asks.key_id", ask.key_id, 40)
        elif len(ask.key_id) > 40:
            raise InvalidRequest("asks.key_id is longer than 40 characters", param="asks.key_id")
        _check_amount("asks.want_micros", ask.want_micros)
        _check_amount("asks.min_micros", ask.min_micros)


def _check_report(report: LeaseReport) -> None:
    _require_id("reports.lease_id", report.lease_id, 64)
    _check_amount("reports.used_micros", report.used_micros)
    _check_amount("reports.inflight_micros", report.inflight_micros)
    _check_amount("reports.want_micros", report.want_micros)


def _check_charge(charge: Charge) -> None:
    _require_id("request_id", charge.request_id, 64)
    _require_id("hold_id", charge.hold_id, 64)
    _require_id("user_id", charge.user_id, 40)
    _check_amount("cost_micros", charge.cost_micros)
