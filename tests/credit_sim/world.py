"""A deterministic simulation of credit control: relays, quota processes, the usage stream, faults.

Everything runs in one thread on a virtual clock, driven by one seeded ``random.Random``; the same seed
replays the same run step for step (no wall clock, no hash-ordered iteration). The code under test is the
services' own: :class:`services.relay.meter.credit.LeaseBook` in every relay and
:class:`services.quota.credit.CreditBooks` as the database every quota process shares. Around them the
world plays what the real deployment does:

- requests arrive at random relays for random keys, are admitted on a lease or through the exact path
  (Reserve, with retries and a deadline), run for a while and finish with a cost no larger than their
  worst case; each finished request produces a usage event;
- users have several keys, some with a daily budget of their own, and some users a daily budget too:
  keys without a budget share their user's lease in each relay, once the relay has quota's list of
  budgeted keys (sent with the sync answers, as quota does);
- RPCs are delayed, lost and duplicated; relays sync every interval (and early when a lease runs low);
- the usage topic has one ordered log per partition (users hash to partitions); producers append late,
  twice, or spool while their broker link is down and replay in order later; a dead relay's spool may
  be adopted and replayed by another much later, or be lost;
- quota processes consume the partitions assigned to them, apply a batch, then commit the offset (a crash
  in between redelivers the batch), and expire due holds;
- relays and quota processes crash (losing everything in memory) and restart; balances are topped up.

After every step the invariants are checked (:meth:`Simulation.check`); at the end the world is healed,
drained and run past every horizon, and the books must close: nothing held, every event that reached
the stream charged exactly once, no request charged that never reached an upstream.
"""

from __future__ import annotations

import dataclasses
import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NoReturn, TypeVar

from services.common.credit import (
    LEASE,
    Charge,
    CreditTerms,
    ReserveAnswer,
    ReserveAsk,
    SyncAnswer,
    SyncRequest,
)
from services.quota.credit import OPEN, CreditBooks
from services.quota.leasing import budgeted_keys
from services.relay.meter.credit import Admission, LeaseBook, recall_wait_ms

__all__ = ["Faults", "Simulation", "SimulationFailure"]

_T = TypeVar("_T")

UNIT = 1_000
# A relay's sync deadline (services.relay.meter.leasing.sync_deadline_s with the default RPC timeout): how
# long an exact reserve waits for recalled leases follows from it.
SYNC_DEADLINE_MS = 2_000


class SimulationFailure(AssertionError):
    """An invariant broke; the message names the seed and step that reproduce it."""


@dataclass(frozen=True)
class Faults:
    """How hostile the world is. Probabilities are per message or per step as named."""

    rpc_loss: float = 0.03
    rpc_duplicate: float = 0.03
    # A message stuck for up to seconds (a slow connection, a retry inside the client).
    rpc_slow: float = 0.05
    event_duplicate: float = 0.03
    # Per step (about 300 steps per simulated second): a relay crash every ~20 s, a quota process crash
    # every ~20 s, every quota process down every ~2 min, a relay cut off every ~40 s, ...
    relay_crash: float = 0.00017
    quota_crash: float = 0.00017
    # Every quota process down at once for 5-15 s.
    quota_outage: float = 0.00003
    # One relay cannot reach quota for 2-40 s (it still reaches the broker).
    partition: float = 0.00008
    broker_link_down: float = 0.0002
    top_up: float = 0.0017
    # A dead relay's spool is adopted by another relay with this probability (else lost with its disk).
    spool_adopted: float = 0.7

    @classmethod
    def none(cls) -> Faults:
        return cls(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)


@dataclass
class Request:
    request_id: str
    key_id: str
    user_id: str
    bound: int
    cost: int
    relay: str
    arrived_at: int = 0
    # arriving, dispatched, finished; or refused (the exact path's refusal), recalled (quota still
    # recalling leases for it when the relay stopped waiting), unavailable, lost.
    state: str = "arriving"
    hold_id: str = ""
    # The cost the usage event carries, once the request finished.
    emitted: int | None = None


@dataclass
class Relay:
    name: str
    incarnation: int
    book: LeaseBook
    skew_ms: int
    alive: bool = True
    broker_up: bool = True
    # Quota unreachable from this relay until then (virtual time).
    cut_off_until: int = 0
    spool: list[Charge] = field(default_factory=list)
    inflight: dict[str, Admission | None] = field(default_factory=dict)

    @property
    def relay_id(self) -> str:
        return f"{self.name}.{self.incarnation}"


@dataclass
class Quota:
    name: str
    alive: bool = True
    incarnation: int = 0
    # partition -> next offset to read (memory only: lost in a crash).
    positions: dict[int, int] = field(default_factory=dict)


class Simulation:
    def __init__(
        self,
        seed: int,
        *,
        relays: int = 3,
        quotas: int = 2,
        users: int = 3,
        keys_per_user: int = 4,
        partitions: int = 4,
        faults: Faults | None = None,
        terms: CreditTerms | None = None,
        balance_units: tuple[int, ...] = (1_000_000, 20_000, 300),
        mean_gap_ms: float = 20.0,
        trace_size: int = 40,
        background_traffic: bool = True,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.faults = faults or Faults()
        self.terms = terms or CreditTerms(horizon_ms=60_000, reservation_ttl_ms=120_000)
        self.now = 0
        self.steps = 0
        self._queue: list[tuple[int, int, str, Callable[[], None]]] = []
        self._order = 0
        self._ids = 0
        self.trace: list[str] = []
        self._trace_size = trace_size
        self.mean_gap_ms = mean_gap_ms
        self.traffic = True
        self.hostile = True
        self.syncs = 0
        self.recall_wait_ms = recall_wait_ms(self.terms, SYNC_DEADLINE_MS)

        self.keys = [(f"k{u}.{k}", f"u{u}") for u in range(users) for k in range(keys_per_user)]
        funding = [balance_units[u % len(balance_units)] * UNIT for u in range(users)]
        self.caps = {
            key_id: self.rng.choice([0, 0, funding[int(user_id[1:])] // 3]) for key_id, user_id in self.keys
        }
        self.user_caps = {f"u{u}": self.rng.choice([0, funding[u] // 2]) for u in range(users)}
        self.db = CreditBooks(self.terms, self._windows_of)
        for key_id, cap in self.caps.items():
            if cap:
                self.db.set_cap(f"day:{key_id}", cap)
        for user_id, cap in self.user_caps.items():
            if cap:
                self.db.set_cap(f"day:{user_id}", cap)
        self.funded: dict[str, int] = {}
        for user, amount in enumerate(funding):
            self.db.top_up(f"u{user}", amount)
            self.funded[f"u{user}"] = amount

        self.partitions: list[list[Charge]] = [[] for _ in range(partitions)]
        self.committed = [0] * partitions
        self.requests: dict[str, Request] = {}
        # What the ledger charged each user, and each key, summed from the charges as first posted.
        self.charged: dict[str, int] = {}
        self.key_charged: dict[str, int] = {}
        self.relays = [self._new_relay(f"r{i}", 0) for i in range(relays)]
        self.quotas = [Quota(f"q{i}") for i in range(quotas)]

        for relay in self.relays:
            self._schedule(self.rng.randint(0, self.terms.sync_interval_ms), "sync", self._sync_tick(relay))
        for quota in self.quotas:
            self._schedule(self.rng.randint(0, 50), "consume", self._consume_tick(quota, quota.incarnation))
            self._schedule(self.rng.randint(0, 500), "expire", self._expire_tick(quota, quota.incarnation))
        if background_traffic:
            self._schedule(0, "arrival", self._arrival)

    # --- the run ---------------------------------------------------------------------------------

    def run(self, steps: int) -> None:
        """Run ``steps`` steps of traffic and faults, then heal, drain and check that the books close."""
        while self.steps < steps and self._queue:
            self._step()
        self.settle_down()

    def settle_down(self) -> None:
        self.traffic = False
        self.hostile = False
        for relay in self.relays:
            relay.cut_off_until = 0
            if not relay.alive:
                self._restart_relay(relay)
            if not relay.broker_up:
                self._restore_broker(relay)
        for quota in self.quotas:
            if not quota.alive:
                self._restart_quota(quota)
        quiet_until = (
            self.now + 4 * self.terms.valid_for_ms + self.terms.horizon_ms + self.terms.reservation_ttl_ms
        )
        while self._queue and self._queue[0][0] <= quiet_until:
            self._step()
        self.check_closed()

    def _step(self) -> None:
        at, _, label, action = heapq.heappop(self._queue)
        self.now = at
        self.steps += 1
        self._note(label)
        action()
        if self.hostile:
            self._maybe_fault()
        self.check()

    def _schedule(self, delay: int, label: str, action: Callable[[], None]) -> None:
        self._order += 1
        heapq.heappush(self._queue, (self.now + max(0, delay), self._order, label, action))

    def _note(self, text: str) -> None:
        self.trace.append(f"{self.steps} t={self.now} {text}")
        if len(self.trace) > self._trace_size:
            del self.trace[0]

    def _id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}{self._ids}"

    def _windows_of(self, key_id: str, user_id: str) -> tuple[str, ...]:
        """A key's own window when it has a budget (none for the empty key id of a user-scope lease),
        then its user's."""
        own = (f"day:{key_id}",) if key_id and self.caps.get(key_id) else ()
        return own + ((f"day:{user_id}",) if self.user_caps.get(user_id) else ())

    # --- relays ----------------------------------------------------------------------------------

    def _new_relay(self, name: str, incarnation: int) -> Relay:
        relay_id = f"{name}.{incarnation}"
        book = LeaseBook(relay_id, self.terms, lambda: self._id(f"{relay_id}-L"))
        return Relay(name, incarnation, book, skew_ms=self.rng.randint(-500, 500))

    def _local(self, relay: Relay) -> int:
        return self.now + relay.skew_ms

    def _live(self, relay: Relay, incarnation: int) -> bool:
        return relay.alive and relay.incarnation == incarnation

    def submit(self, at: int, relay_index: int, key_id: str, bound: int, cost: int) -> None:
        """Schedule one request (scenarios drive exact workloads with this)."""
        user_id = dict(self.keys)[key_id]
        self._schedule(
            at - self.now,
            "submit",
            lambda: self._admit(self.relays[relay_index], key_id, user_id, bound, cost),
        )

    def run_until(self, at: int) -> None:
        while self._queue and self._queue[0][0] <= at:
            self._step()

    def crash_all_quotas(self, down_for: int) -> None:
        for quota in self.quotas:
            self._crash_quota(quota, down_for)

    def _arrival(self) -> None:
        if not self.traffic:
            return
        self._schedule(max(1, int(self.rng.expovariate(1 / self.mean_gap_ms))), "arrival", self._arrival)
        relay = self.rng.choice(self.relays)
        key_id, user_id = self.rng.choice(self.keys)
        bound = self.rng.randint(1, 40) * UNIT
        roll = self.rng.random()
        cost = 0 if roll < 0.1 else bound if roll < 0.3 else self.rng.randint(0, bound)
        self._admit(relay, key_id, user_id, bound, cost)

    def _admit(self, relay: Relay, key_id: str, user_id: str, bound: int, cost: int) -> None:
        if not relay.alive:
            return
        request = Request(self._id("q"), key_id, user_id, bound, cost, relay.relay_id, arrived_at=self.now)
        self.requests[request.request_id] = request
        admission = relay.book.admit(key_id, user_id, bound, self._local(relay))
        if admission is not None:
            hold = self.db.holds.get(admission.lease_id)
            if hold is None or hold.state != OPEN:
                self._fail(
                    f"{relay.relay_id} admitted {request.request_id} on lease {admission.lease_id} "
                    f"that quota has {hold.state if hold else 'never granted'}"
                )
            request.hold_id = admission.lease_id
            self._dispatch(relay, request, admission)
        else:
            request.hold_id = self._id(f"{relay.relay_id}-R")
            self._reserve(relay, relay.incarnation, request, attempt=0, give_up=None)
        if relay.book.sync_due(self._local(relay)):
            self._sync(relay)

    def _reserve(
        self, relay: Relay, incarnation: int, request: Request, *, attempt: int, give_up: int | None
    ) -> None:
        """The exact path as the relay runs it (services.relay.meter.accounting): a Reserve with a deadline,
        tried again after each "retry" until ``recall_wait_ms`` after the first one."""
        ask = ReserveAsk(request.hold_id, request.key_id, request.user_id, request.bound)
        answered = [False]

        def on_answer(answer: ReserveAnswer) -> None:
            if answered[0] or not self._live(relay, incarnation) or request.state != "arriving":
                return
            answered[0] = True
            if answer.state == "held":
                self._dispatch(relay, request, None)
            elif answer.state == "retry":
                until = give_up if give_up is not None else self.now + self.recall_wait_ms
                if self.now >= until:
                    request.state = "recalled"
                    return
                wait = min(max(answer.retry_after_ms, self.terms.sync_interval_ms // 10), until - self.now)
                self._schedule(
                    wait,
                    "reserve-retry",
                    lambda: self._reserve(relay, incarnation, request, attempt=0, give_up=until),
                )
            else:
                request.state = "refused"

        def on_timeout() -> None:
            if answered[0] or not self._live(relay, incarnation) or request.state != "arriving":
                return
            answered[0] = True
            if attempt < 2:
                self._reserve(relay, incarnation, request, attempt=attempt + 1, give_up=give_up)
            else:
                request.state = "unavailable"

        self._rpc(relay, lambda: self.db.reserve(ask, self.now), on_answer, "reserve")
        self._schedule(500, "reserve-deadline", on_timeout)

    def _dispatch(self, relay: Relay, request: Request, admission: Admission | None) -> None:
        request.state = "dispatched"
        relay.inflight[request.request_id] = admission
        duration = self.rng.randint(5, 200) if self.rng.random() < 0.9 else self.rng.randint(200, 4_000)
        incarnation = relay.incarnation
        self._schedule(duration, "finish", lambda: self._finish(relay, incarnation, request))

    def _finish(self, relay: Relay, incarnation: int, request: Request) -> None:
        if not self._live(relay, incarnation):
            return
        admission = relay.inflight.pop(request.request_id)
        cost = relay.book.finish(admission, request.cost) if admission else min(request.cost, request.bound)
        request.state = "finished"
        request.emitted = cost
        self._produce(
            relay,
            incarnation,
            Charge(request.request_id, request.hold_id, request.key_id, request.user_id, cost),
        )

    def _produce(self, relay: Relay, incarnation: int, event: Charge) -> None:
        def deliver() -> None:
            if not self._live(relay, incarnation):
                # The broker may have taken it before the relay died (only the ack was lost).
                if self.rng.random() < 0.5:
                    self._append(event)
                return
            if relay.broker_up:
                self._append(event)
                if self.hostile and self.rng.random() < self.faults.event_duplicate:
                    self._schedule(self.rng.randint(1, 3_000), "duplicate-event", lambda: self._append(event))
            else:
                relay.spool.append(event)

        self._schedule(self.rng.randint(0, 10), "produce", deliver)

    def _append(self, event: Charge) -> None:
        partition = int(event.user_id[1:]) % len(self.partitions)
        self.partitions[partition].append(event)

    def _sync_tick(self, relay: Relay) -> Callable[[], None]:
        incarnation = relay.incarnation

        def tick() -> None:
            if not self._live(relay, incarnation):
                return
            jitter = self.rng.randint(-50, 50)
            self._schedule(self.terms.sync_interval_ms + jitter, "sync", self._sync_tick(relay))
            if relay.book.sync_due(self._local(relay)):
                self._sync(relay)

        return tick

    def _sync(self, relay: Relay) -> None:
        sent_at = self._local(relay)
        request = relay.book.sync_request(sent_at)
        self.syncs += 1
        incarnation = relay.incarnation

        def on_answer(answer: SyncAnswer) -> None:
            if self._live(relay, incarnation):
                relay.book.apply(answer, sent_at)

        self._rpc(relay, lambda: self._sync_on_quota(request), on_answer, "sync")

    def _sync_on_quota(self, request: SyncRequest) -> SyncAnswer:
        answer = self.db.sync(request, self.now)
        listed = budgeted_keys(sorted(key_id for key_id, cap in self.caps.items() if cap))
        if listed.version != request.budgeted_version:
            answer = dataclasses.replace(answer, budgeted=listed)
        return answer

    def _rpc(
        self, relay: Relay, handle: Callable[[], _T], on_answer: Callable[[_T], None], label: str
    ) -> None:
        """One RPC to a random quota process: delayed, maybe lost or duplicated, answered if it lives."""
        if self.now < relay.cut_off_until:
            return
        quota = self.rng.choice(self.quotas)
        incarnation = quota.incarnation
        copies = 2 if self.hostile and self.rng.random() < self.faults.rpc_duplicate else 1
        for _ in range(copies):
            if self.hostile and self.rng.random() < self.faults.rpc_loss:
                continue

            def serve() -> None:
                if not (quota.alive and quota.incarnation == incarnation):
                    return
                answer = handle()
                if self.hostile and self.rng.random() < self.faults.rpc_loss:
                    return
                self._schedule(self._delay(), f"{label}-answer", lambda: on_answer(answer))

            self._schedule(self._delay(), label, serve)

    def _delay(self) -> int:
        if self.hostile and self.rng.random() < self.faults.rpc_slow:
            return self.rng.randint(200, 3_000)
        return self.rng.randint(1, 20)

    # --- quota -----------------------------------------------------------------------------------

    def _assigned(self, quota: Quota) -> list[int]:
        alive = [q for q in self.quotas if q.alive]
        if quota not in alive:
            return []
        index = alive.index(quota)
        return [p for p in range(len(self.partitions)) if p % len(alive) == index]

    def _consume_tick(self, quota: Quota, incarnation: int) -> Callable[[], None]:
        def tick() -> None:
            if not (quota.alive and quota.incarnation == incarnation):
                return
            self._schedule(self.rng.randint(20, 100), "consume", self._consume_tick(quota, incarnation))
            for partition in self._assigned(quota):
                start = quota.positions.get(partition, self.committed[partition])
                batch = self.partitions[partition][start : start + 50]
                if not batch:
                    continue
                for event in batch:
                    self._apply_charge(event)
                end = start + len(batch)
                quota.positions[partition] = end
                self._schedule(
                    self.rng.randint(1, 5), "commit", self._commit(quota, incarnation, partition, end)
                )

        return tick

    def _commit(self, quota: Quota, incarnation: int, partition: int, offset: int) -> Callable[[], None]:
        def commit() -> None:
            if quota.alive and quota.incarnation == incarnation:
                self.committed[partition] = max(self.committed[partition], offset)

        return commit

    def _apply_charge(self, event: Charge) -> None:
        request = self.requests.get(event.request_id)
        if request is None or request.emitted is None:
            self._fail(f"charge for {event.request_id}, a request that never finished")
        if request.emitted != event.cost_micros:
            self._fail(
                f"charge for {event.request_id} is {event.cost_micros}, the request cost {request.emitted}"
            )
        first = event.request_id not in self.db.posted
        posted = self.db.charge(event)
        if first:
            self.charged[posted.user_id] = self.charged.get(posted.user_id, 0) + posted.charged
            self.key_charged[request.key_id] = self.key_charged.get(request.key_id, 0) + posted.charged
            hold = self.db.holds.get(event.hold_id)
            if (
                self.caps.get(request.key_id)
                and posted.charged
                and (hold is None or f"day:{request.key_id}" not in hold.windows)
            ):
                self._fail(
                    f"charge for {event.request_id} of budgeted key {request.key_id} went to hold "
                    f"{event.hold_id}, which does not count against the key's budget"
                )
        if posted.cost != request.emitted:
            self._fail(f"ledger cost {posted.cost} for {event.request_id}, logged cost {request.emitted}")

    def _expire_tick(self, quota: Quota, incarnation: int) -> Callable[[], None]:
        def tick() -> None:
            if not (quota.alive and quota.incarnation == incarnation):
                return
            self._schedule(self.rng.randint(200, 700), "expire", self._expire_tick(quota, incarnation))
            self.db.expire(self.now)

        return tick

    # --- faults ----------------------------------------------------------------------------------

    def _maybe_fault(self) -> None:
        roll = self.rng.random()
        faults = self.faults
        if roll < faults.relay_crash:
            self._crash_relay(self.rng.choice(self.relays))
            return
        roll -= faults.relay_crash
        if roll < faults.quota_crash:
            self._crash_quota(self.rng.choice(self.quotas), self.rng.randint(200, 3_000))
            return
        roll -= faults.quota_crash
        if roll < faults.quota_outage:
            down_for = self.rng.randint(5_000, 15_000)
            for quota in self.quotas:
                self._crash_quota(quota, down_for)
            return
        roll -= faults.quota_outage
        if roll < faults.partition:
            relay = self.rng.choice(self.relays)
            relay.cut_off_until = self.now + self.rng.randint(2_000, 40_000)
            self._note(f"{relay.relay_id} cut off from quota until {relay.cut_off_until}")
            return
        roll -= faults.partition
        if roll < faults.broker_link_down:
            relay = self.rng.choice(self.relays)
            if relay.alive and relay.broker_up:
                relay.broker_up = False
                self._note(f"{relay.relay_id} loses the broker")
                incarnation = relay.incarnation
                self._schedule(
                    self.rng.randint(1_000, 20_000),
                    "broker-back",
                    lambda: self._restore_broker(relay) if self._live(relay, incarnation) else None,
                )
        elif roll < faults.broker_link_down + faults.top_up:
            user = self.rng.choice(sorted(self.funded))
            amount = self.rng.randint(1, 200) * UNIT
            self.db.top_up(user, amount)
            self.funded[user] += amount

    def _crash_relay(self, relay: Relay) -> None:
        if not relay.alive:
            return
        self._note(
            f"{relay.relay_id} crashes with {len(relay.inflight)} in flight, {len(relay.spool)} spooled"
        )
        relay.alive = False
        for request in self.requests.values():
            if request.relay == relay.relay_id and request.state in ("arriving", "dispatched"):
                request.state = "lost"
        relay.inflight.clear()
        spool, relay.spool = relay.spool, []
        if spool and self.rng.random() < self.faults.spool_adopted:
            self._schedule(self.rng.randint(1_000, 120_000), "spool-adopted", lambda: self._replay(spool))
        self._schedule(self.rng.randint(500, 5_000), "relay-restart", lambda: self._restart_relay(relay))

    def _restart_relay(self, relay: Relay) -> None:
        if relay.alive:
            return
        fresh = self._new_relay(relay.name, relay.incarnation + 1)
        relay.incarnation, relay.book, relay.skew_ms = fresh.incarnation, fresh.book, fresh.skew_ms
        relay.alive, relay.broker_up = True, True
        self._schedule(0, "sync", self._sync_tick(relay))

    def _restore_broker(self, relay: Relay) -> None:
        relay.broker_up = True
        spool, relay.spool = relay.spool, []
        self._replay(spool)

    def _replay(self, events: list[Charge]) -> None:
        for event in events:
            self._append(event)

    def _crash_quota(self, quota: Quota, down_for: int) -> None:
        if not quota.alive:
            return
        self._note(f"{quota.name} crashes")
        quota.alive = False
        quota.positions.clear()
        for other in self.quotas:
            other.positions.clear()  # a rebalance: every consumer restarts from the committed offsets
        self._schedule(down_for, "quota-restart", lambda: self._restart_quota(quota))

    def _restart_quota(self, quota: Quota) -> None:
        if quota.alive:
            return
        quota.alive = True
        quota.incarnation += 1
        for other in self.quotas:
            other.positions.clear()
        self._schedule(0, "consume", self._consume_tick(quota, quota.incarnation))
        self._schedule(0, "expire", self._expire_tick(quota, quota.incarnation))

    # --- invariants ------------------------------------------------------------------------------

    def check(self) -> None:
        problems = self.db.problems()
        for user, funded in self.funded.items():
            balance = self.db.accounts[user].balance
            charged = self.charged.get(user, 0)
            if balance + charged != funded or self.db.charged.get(user, 0) != charged:
                problems.append(f"{user}: balance {balance} + charged {charged} != funded {funded}")
        # Budgets, from the ledger's side (the books check their windows): no key or user has been
        # charged more than its cap, whichever leases its requests were admitted on.
        for key_id, cap in self.caps.items():
            if cap and self.key_charged.get(key_id, 0) > cap:
                problems.append(f"key {key_id}: charged {self.key_charged[key_id]} > budget {cap}")
        for user, cap in self.user_caps.items():
            if cap and self.charged.get(user, 0) > cap:
                problems.append(f"user {user}: charged {self.charged[user]} > budget {cap}")
        for relay in self.relays:
            if not relay.alive:
                continue
            for lease in relay.book.leases():
                if lease.used + lease.inflight > max(lease.granted, 0) and lease.state != "pending":
                    problems.append(f"{relay.relay_id} lease {lease.lease_id}: admitted beyond its grant")
                hold = self.db.holds.get(lease.lease_id)
                if (
                    hold is not None
                    and hold.state in (OPEN, "closing")
                    and hold.granted < lease.used + lease.inflight
                ):
                    problems.append(
                        f"lease {lease.lease_id}: quota holds {hold.granted}, the relay has "
                        f"{lease.used} used + {lease.inflight} in flight"
                    )
        if problems:
            self._fail("; ".join(problems))

    def check_closed(self) -> None:
        """After healing and draining: nothing held, every streamed event charged once, nothing else."""
        problems: list[str] = []
        for hold in self.db.active_holds():
            problems.append(f"hold {hold.hold_id} ({hold.kind}) still {hold.state} with {hold.amount}")
        streamed = {event.request_id for partition in self.partitions for event in partition}
        for request_id in streamed:
            if request_id not in self.db.posted:
                problems.append(f"event {request_id} reached the stream but was never charged")
        for request_id, posted in self.db.posted.items():
            request = self.requests[request_id]
            if request.state != "finished":
                problems.append(f"{request_id} charged {posted.charged} but it is {request.state}")
        for request in self.requests.values():
            if request.state == "dispatched":
                problems.append(f"{request.request_id} never finished")
        if any(lease for relay in self.relays for lease in relay.book.leases()):
            problems.append("a relay still holds leases after going quiet")
        if problems:
            self._fail("; ".join(problems[:10]))

    def summary(self) -> dict[str, int]:
        states: dict[str, int] = {}
        for request in self.requests.values():
            states[request.state] = states.get(request.state, 0) + 1
        leased = sum(1 for request in self.requests.values() if "-L" in request.hold_id)
        shared = {hold.hold_id for hold in self.db.holds.values() if hold.kind == LEASE and not hold.key_id}
        return {
            "steps": self.steps,
            "requests": len(self.requests),
            "leased": leased,
            "on_shared": sum(1 for request in self.requests.values() if request.hold_id in shared),
            "shared_leases": len(shared),
            "leases": sum(1 for hold in self.db.holds.values() if hold.kind == LEASE),
            "syncs": self.syncs,
            "charges": len(self.db.posted),
            "written_off": sum(posted.written_off for posted in self.db.posted.values()),
            **states,
        }

    def _fail(self, problem: str) -> NoReturn:
        trace = "\n  ".join(self.trace)
        raise SimulationFailure(
            f"seed {self.seed}, step {self.steps} (t={self.now} ms): {problem}\n"
            f"reproduce: python -m tests.credit_sim --seed {self.seed} --steps {self.steps}\n"
            f"last steps:\n  {trace}"
        )
