"""The relay process's credit leases: the :class:`~services.relay.meter.credit.LeaseBook` and its sync loop.

Requests are admitted on a lease without an RPC (:meth:`Leasing.admit`; the key's own, or the one its
user's keys without budgets of their own share, see :mod:`services.relay.meter.credit`); a background task
checks every ``poll_s`` whether the book wants a sync (:meth:`LeaseBook.sync_due`) and, when it does,
sends quota one ``Sync`` with every lease's report and the new asks, then applies the answer (and
quota's list of budgeted keys when the relay's copy was out of date).

A sync's deadline (:func:`sync_deadline_s`) is longer than one interval: an answer is applied relative
to when its sync was *sent*, so a late one is still safe, and under load (a burst of exact reserves, a
recall) a deadline of one short interval fails every sync exactly when the recalls and closing reports
they carry are needed. It stays under half of what a grant lets the relay admit, so one stalled sync
cannot keep the next from renewing the leases. A failed sync changes nothing in the book (its leases
keep admitting until their validity ends, see :mod:`services.relay.meter.credit`) and is tried again at the
next interval.

The relay id is fresh per process start, so quota tells a restarted relay from the one before it and
expires the old process's leases on their own. On shutdown every lease is given back: the book closes
them all and syncs until quota forgot them or ``shutdown_s`` passed (quota expires the rest).

This module is the only place that translates between the protocol's plain messages
(:mod:`services.common.credit`) and ``relaygate.quota.v1``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from services.common.credit import BudgetedKeys, CreditTerms, Grant, SyncAnswer, SyncRequest
from services.common.errors import GatewayError
from services.common.grpc import call
from services.common.ids import new_id
from services.common.pb.relaygate.auth.v1.auth_pb2 import Principal
from services.common.pb.relaygate.quota.v1 import quota_pb2 as pb
from services.common.tasks import cancel_and_wait
from services.common.telemetry import METRICS
from services.relay.meter.credit import Admission, LeaseBook, LocalLease, recall_wait_ms

if TYPE_CHECKING:
    from services.common.pb.relaygate.quota.v1.quota_pb2_grpc import QuotaServiceAsyncStub

__all__ = ["Leasing", "answer_from_pb", "leasable", "monotonic_ms", "request_to_pb", "sync_deadline_s"]

log = logging.getLogger(__name__)

# A failing sync is logged at most this often (it is retried every interval).
_WARN_EVERY_MS = 10_000


def monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


def request_to_pb(request: SyncRequest) -> pb.SyncRequest:
    """The wire form of ``request`` (quota reads the budgets a new lease holds against itself)."""
    message = pb.SyncRequest(
        relay_id=request.relay_id, seq=request.seq, budgeted_keys_version=request.budgeted_version
    )
    for report in request.reports:
        message.reports.add(
            lease_id=report.lease_id,
            used_micros=report.used_micros,
            inflight_micros=report.inflight_micros,
            want_micros=report.want_micros,
            closing=report.closing,
        )
    for ask in request.asks:
        message.asks.add(
            lease_id=ask.lease_id,
            key_id=ask.key_id,
            user_id=ask.user_id,
            want_micros=ask.want_micros,
            min_micros=ask.min_micros,
            scope=ask.scope,
        )
    return message


def answer_from_pb(message: pb.SyncResponse) -> SyncAnswer:
    budgeted = None
    if message.HasField("budgeted_keys"):
        listed = message.budgeted_keys
        budgeted = BudgetedKeys(listed.version, frozenset(listed.key_ids), listed.complete)
    return SyncAnswer(
        tuple(
            Grant(
                lease_id=grant.lease_id,
                state=grant.state,
                granted_micros=grant.granted_micros,
                valid_for_ms=grant.valid_for_ms,
                recall=grant.recall,
            )
            for grant in message.grants
        ),
        budgeted,
    )


def sync_deadline_s(terms: CreditTerms, rpc_timeout_s: float) -> float:
    """How long one sync may take: the request path's RPC deadline, but no more than half of what a
    grant lets the relay admit (a sync still waiting then blocks the one that would renew it), and
    never less than one interval."""
    admits_for_s = (terms.valid_for_ms - terms.margin_ms) / 1000
    return max(terms.sync_interval_ms / 1000, min(rpc_timeout_s, admits_for_s / 2))


def leasable(principal: Principal) -> bool:
    """Whether the key's requests may be admitted on a lease: RPM, TPM and concurrency limits are
    enforced by quota's Reserve across every relay, so a key (or user) with one stays exact."""
    for limits in (principal.key_limits, principal.user_limits):
        if limits.rpm or limits.tpm or limits.max_concurrency:
            return False
    return True


class Leasing:
    """Admissions on leases and the sync loop of one relay process; owned by the relay's lifespan."""

    def __init__(
        self,
        stub: QuotaServiceAsyncStub,
        terms: CreditTerms,
        *,
        rpc_timeout_s: float = 2.0,
        poll_s: float = 0.05,
        shutdown_s: float = 2.0,
        clock: Callable[[], int] = monotonic_ms,
    ) -> None:
        self._stub = stub
        self._poll_s = poll_s
        self._deadline_s = sync_deadline_s(terms, rpc_timeout_s)
        self._shutdown_s = shutdown_s
        self._clock = clock
        self.relay_id = new_id("rly")
        self.book = LeaseBook(self.relay_id, terms, lambda: new_id("lse"), on_turn=self._turned)
        self._task: asyncio.Task[None] | None = None
        self._warned_at = -_WARN_EVERY_MS

    @property
    def recall_wait_s(self) -> float:
        """How long an exact reserve waits for leases quota recalled for it (see ``recall_wait_ms``)."""
        return recall_wait_ms(self.book.terms, int(self._deadline_s * 1000)) / 1000

    # --- requests --------------------------------------------------------------------------------

    def admit(self, principal: Principal, bound: int) -> Admission | None:
        """Admit a request whose worst case is ``bound`` on its scope's lease (the key's own, or the one
        its user's keys without budgets share), or None (exact path)."""
        return self.book.admit(principal.key_id, principal.user_id, bound, self._clock())

    def finish(self, admission: Admission, cost: int) -> int:
        """The request is over; returns what its usage event charges (at most its admitted bound)."""
        return self.book.finish(admission, cost)

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="credit-sync")

    async def close(self) -> None:
        """Give every lease back: stop the loop, close them all, sync until quota forgot them (or
        ``shutdown_s``); what is left expires in quota."""
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        self.book.close_all()
        deadline = self._clock() + int(self._shutdown_s * 1000)
        while not self.book.idle and self._clock() < deadline:
            await self.sync()
            if not self.book.idle:
                await asyncio.sleep(min(self._poll_s * 2, max(0.0, (deadline - self._clock()) / 1000)))
        if not self.book.idle:
            log.warning(
                "leases not given back at shutdown; quota expires them",
                extra={"relay_id": self.relay_id, "leases": len(self.book.leases())},
            )

    def _turned(self, lease: LocalLease, reason: str) -> None:
        """One line per turn of a lease (granted, closing, forgotten) and why: a lease that stops
        admitting sends its scope's requests down the exact path, and this says when and why. An ask
        that never opened (refused, rescoped) is a debug line: a refused scope asks again every
        ``exact_for_ms``."""
        log.log(
            logging.INFO if lease.granted else logging.DEBUG,
            "credit lease %s: %s",
            lease.state if self.book.lease(lease.lease_id) is lease else "forgotten",
            reason,
            extra={
                "relay_id": self.relay_id,
                "lease_id": lease.lease_id,
                "scope": lease.scope,
                "granted": lease.granted,
                "used": lease.used,
                "inflight": lease.inflight,
                "admits_for_ms": lease.expires_at - self._clock() if lease.expires_at else 0,
            },
        )

    # --- syncs -----------------------------------------------------------------------------------

    async def sync(self) -> bool:
        """Send one sync now and apply its answer; False when quota did not answer."""
        sent_at = self._clock()
        request = self.book.sync_request(sent_at)
        message = request_to_pb(request)
        try:
            answer = await call(self._stub.Sync, message, timeout=self._deadline_s)
        except GatewayError as exc:
            METRICS.relay_credit_syncs.labels(outcome="failed").inc()
            if sent_at - self._warned_at >= _WARN_EVERY_MS:
                self._warned_at = sent_at
                log.warning(
                    "credit sync failed; leases keep admitting until their validity ends: %s",
                    exc.message,
                    extra={"relay_id": self.relay_id, "code": exc.code, "leases": len(request.reports)},
                )
            return False
        self.book.apply(answer_from_pb(answer), sent_at)
        METRICS.relay_credit_syncs.labels(outcome="ok").inc()
        return True

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            if self.book.sync_due(self._clock()):
                try:
                    await self.sync()
                except Exception:
                    # The loop must outlive any single bad answer; the next interval tries again.
                    log.exception("credit sync crashed")
