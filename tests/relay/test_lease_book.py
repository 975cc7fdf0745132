"""The relay's lease book on its own (no I/O): when it asks for leases, when a sync goes early, what it
remembers of quiet keys, and which keys share their user's lease."""

from __future__ import annotations

from services.common.credit import (
    KEY_SCOPE,
    RESCOPE,
    USER_SCOPE,
    BudgetedKeys,
    CreditTerms,
    Grant,
    SyncAnswer,
)
from services.relay.meter.credit import (
    CLOSING,
    EXPIRED,
    GRANTED,
    IDLE,
    OPEN,
    PENDING,
    QUOTA_CLOSED,
    RECALLED,
    REFUSED,
    SHUTTING_DOWN,
    LeaseBook,
    LocalLease,
    recall_wait_ms,
    user_scope,
)

TERMS = CreditTerms()
BOUND = 1_000


def book() -> LeaseBook:
    ids = iter(range(1_000_000))
    return LeaseBook("r1", TERMS, lambda: f"L{next(ids)}")


def leased(lease_book: LeaseBook, key_id: str = "k1", at: int = 0) -> str:
    """Two requests of ``key_id`` and the sync that asks: returns the open lease's id."""
    assert lease_book.admit(key_id, "u1", BOUND, at) is None
    assert lease_book.admit(key_id, "u1", BOUND, at + 10) is None
    request = lease_book.sync_request(at + 20)
    [ask] = request.asks
    lease_book.apply(SyncAnswer((Grant(ask.lease_id, OPEN, 100 * BOUND, TERMS.valid_for_ms),)), at + 20)
    assert lease_book.admit(key_id, "u1", BOUND, at + 30) is not None
    return ask.lease_id


def test_a_recalled_lease_is_reported_closing_at_the_next_poll_not_the_next_interval() -> None:
    lease_book = book()
    lease_id = leased(lease_book)
    sent_at = 1_000
    lease_book.sync_request(sent_at)
    lease_book.apply(
        SyncAnswer((Grant(lease_id, OPEN, 100 * BOUND, TERMS.valid_for_ms, recall=True),)), sent_at
    )
    # A tenth of an interval later (the floor between two syncs), not a whole interval.
    soon = sent_at + TERMS.sync_interval_ms // 10
    assert not lease_book.sync_due(soon - 1)
    assert lease_book.sync_due(soon)
    [report] = lease_book.sync_request(soon).reports
    assert (report.lease_id, report.closing) == (lease_id, True)
    # Told once: the sync after it waits for the interval again.
    assert not lease_book.sync_due(soon + TERMS.sync_interval_ms // 2)


def test_a_lease_reaching_its_idle_time_is_given_back_then_not_an_interval_later() -> None:
    lease_book = book()
    lease_id = leased(lease_book)
    lease_book.sync_request(500)
    idle_at = 30 + TERMS.idle_ms
    lease_book.sync_request(idle_at - 600)
    assert not lease_book.sync_due(idle_at - 1)
    assert lease_book.sync_due(idle_at)
    [report] = lease_book.sync_request(idle_at).reports
    assert (report.lease_id, report.closing) == (lease_id, True)


def test_the_book_tells_each_turn_of_a_lease_and_why() -> None:
    """What the relay logs: a lease granted, then closed by the relay (idle, expired, recalled,
    shutting down) or by quota, and asks quota refused."""
    turns: list[tuple[str, str, str]] = []
    ids = iter(range(1_000_000))

    def turned(lease: LocalLease, why: str) -> None:
        turns.append((lease.lease_id, lease.state, why))

    lease_book = LeaseBook("r1", TERMS, lambda: f"L{next(ids)}", on_turn=turned)

    def granted(key_id: str, at: int) -> str:
        lease_id = leased(lease_book, key_id, at)
        assert turns[-1] == (lease_id, OPEN, GRANTED)
        return lease_id

    idle = granted("k1", 0)
    # Quiet for idle_ms, renewed meanwhile: closes idle, and is forgotten once quota closed it.
    lease_book.apply(SyncAnswer((Grant(idle, OPEN, 100 * BOUND, TERMS.valid_for_ms),)), TERMS.idle_ms - 10)
    lease_book.sync_request(30 + TERMS.idle_ms)
    lease_book.apply(SyncAnswer((Grant(idle, "closed"),)), 30 + TERMS.idle_ms)
    assert turns[-2:] == [(idle, CLOSING, IDLE), (idle, CLOSING, QUOTA_CLOSED)]

    at = 100_000
    expired = granted("k2", at)
    # No sync answered since the grant: it stops admitting margin_ms before its validity.
    lease_book.sync_request(at + 20 + TERMS.valid_for_ms - TERMS.margin_ms)
    assert turns[-1] == (expired, CLOSING, EXPIRED)

    at = 200_000
    recalled = granted("k3", at)
    lease_book.apply(
        SyncAnswer((Grant(recalled, OPEN, 100 * BOUND, TERMS.valid_for_ms, recall=True),)), at + 40
    )
    assert turns[-1] == (recalled, CLOSING, RECALLED)

    at = 300_000
    lease_book.admit("k4", "u1", BOUND, at)
    lease_book.admit("k4", "u1", BOUND, at + 10)
    [ask] = lease_book.sync_request(at + 20).asks
    lease_book.apply(SyncAnswer((Grant(ask.lease_id, "refused"),)), at + 20)
    assert turns[-1] == (ask.lease_id, PENDING, REFUSED)

    open_at_shutdown = granted("k5", 400_000)
    lease_book.close_all()
    assert turns[-1] == (open_at_shutdown, CLOSING, SHUTTING_DOWN)
    # Leases already closing are not turned again; each one turned once per reason.
    assert len(turns) == len(set(turns))


def test_a_key_seen_once_every_20_s_never_asks_for_a_lease() -> None:
    lease_book = book()
    for visit in range(10):
        at = visit * 20_000
        assert lease_book.admit("k1", "u1", BOUND, at) is None
        request = lease_book.sync_request(at + 1)
        assert request.asks == () and request.reports == ()
    # Seen again within idle_ms of its last visit: now a lease will be used, and the book asks.
    again = 180_000 + TERMS.idle_ms - 1
    assert lease_book.admit("k1", "u1", BOUND, again) is None
    assert [ask.key_id for ask in lease_book.sync_request(again + 1).asks] == ["k1"]


def test_many_quiet_keys_leave_no_state_behind() -> None:
    # 10,000 keys, each seen once, about 500 a second (bench scenario 7's rotation).
    lease_book = book()
    at = 0
    for index in range(10_000):
        at = index * 2
        lease_book.admit(f"k{index}", "u1", BOUND, at)
        if index % 500 == 0:
            lease_book.sync_request(at)
    assert lease_book.leases() == []
    lease_book.sync_request(at + TERMS.idle_ms)
    # Only the keys seen within the last idle_ms are remembered, and after it none.
    assert lease_book.remembered() <= 1
    lease_book.sync_request(at + 2 * TERMS.idle_ms)
    assert lease_book.remembered() == 0


def test_a_refused_key_is_forgotten_once_its_exact_time_is_over() -> None:
    lease_book = book()
    lease_book.admit("k1", "u1", BOUND, 0)
    lease_book.admit("k1", "u1", BOUND, 10)
    [ask] = lease_book.sync_request(20).asks
    lease_book.apply(SyncAnswer((Grant(ask.lease_id, "refused"),)), 20)
    # Exact for exact_for_ms: no new ask meanwhile.
    lease_book.admit("k1", "u1", BOUND, 30)
    assert lease_book.sync_request(40).asks == ()
    lease_book.sync_request(20 + TERMS.exact_for_ms + TERMS.idle_ms)
    assert lease_book.remembered() == 0


def test_an_exact_reserve_waits_as_long_as_a_live_relay_takes_to_give_a_lease_back() -> None:
    # Defaults: syncs every second with a 2 s deadline; the sync in flight, the one carrying the
    # recall and the closing report, then one of quota's retry-afters.
    assert recall_wait_ms(TERMS, 2_000) == 2_000 + 4_000 + 100 + 2_000
    # A slower deadline waits longer; never less than the three syncs' intervals.
    assert recall_wait_ms(TERMS, 4_000) == 4_000 + 8_000 + 100 + 2_000
    assert recall_wait_ms(TERMS, 0) == 1_000 + 100 + 2_000


def knowing(budgeted: frozenset[str] = frozenset(), *, complete: bool = True) -> LeaseBook:
    """A book that has quota's list of budgeted keys (from its first sync's answer)."""
    lease_book = book()
    request = lease_book.sync_request(0)
    assert request.budgeted_version == ""
    lease_book.apply(SyncAnswer(budgeted=BudgetedKeys("v1", budgeted, complete)), 0)
    assert lease_book.sync_request(1).budgeted_version == "v1"
    return lease_book


def test_rotating_keys_of_one_user_ask_on_the_users_rate_and_share_one_lease() -> None:
    lease_book = knowing()
    # Two different keys, each seen once: the user's second request asks (a user-scope lease).
    assert lease_book.admit("k0", "u1", BOUND, 100) is None
    assert lease_book.admit("k1", "u1", BOUND, 110) is None
    [ask] = lease_book.sync_request(120).asks
    assert (ask.scope, ask.key_id, ask.user_id) == (USER_SCOPE, "k1", "u1")
    lease_book.apply(SyncAnswer((Grant(ask.lease_id, OPEN, 100 * BOUND, TERMS.valid_for_ms),)), 120)
    # Then every key of the user, each seen for the first time, is admitted on it without an RPC.
    admissions = [lease_book.admit(f"k{index}", "u1", BOUND, 130 + index) for index in range(2, 52)]
    assert all(a is not None and a.lease_id == ask.lease_id for a in admissions)
    # The request's own key stays on its admission (its event and log name it).
    assert [a.key_id for a in admissions if a is not None][:2] == ["k2", "k3"]
    assert [lease.scope for lease in lease_book.leases()] == [user_scope("u1")]
    # Another user's keys do not share it.
    assert lease_book.admit("k99", "u2", BOUND, 200) is None


def test_a_key_quota_lists_as_budgeted_keeps_a_lease_of_its_own() -> None:
    lease_book = knowing(frozenset({"kb"}))
    lease_book.admit("k0", "u1", BOUND, 100)
    lease_book.admit("k1", "u1", BOUND, 110)
    [shared] = lease_book.sync_request(120).asks
    lease_book.apply(SyncAnswer((Grant(shared.lease_id, OPEN, 100 * BOUND, TERMS.valid_for_ms),)), 120)
    # The budgeted key is never admitted on the user's lease: its own scope, asked on its own rate.
    assert lease_book.admit("kb", "u1", BOUND, 130) is None
    assert lease_book.admit("kb", "u1", BOUND, 140) is None
    [own] = lease_book.sync_request(150).asks
    assert (own.scope, own.key_id) == (KEY_SCOPE, "kb")
    lease_book.apply(SyncAnswer((Grant(own.lease_id, OPEN, 100 * BOUND, TERMS.valid_for_ms),)), 150)
    admission = lease_book.admit("kb", "u1", BOUND, 160)
    assert admission is not None and admission.lease_id == own.lease_id
    # A budget set later (quota's next list names k0): k0 leaves the shared lease at once.
    lease_book.apply(SyncAnswer(budgeted=BudgetedKeys("v2", frozenset({"kb", "k0"}))), 170)
    assert lease_book.admit("k0", "u1", BOUND, 180) is None
    on_shared = lease_book.admit("k5", "u1", BOUND, 190)
    assert on_shared is not None and on_shared.lease_id == shared.lease_id


def test_without_quotas_list_every_key_is_its_own_scope() -> None:
    # Before the first answer, and when quota's list is incomplete (too many budgeted keys).
    for lease_book in (book(), knowing(complete=False)):
        lease_book.admit("k0", "u1", BOUND, 100)
        lease_book.admit("k1", "u1", BOUND, 110)
        assert lease_book.sync_request(120).asks == ()
        lease_book.admit("k1", "u1", BOUND, 130)
        [ask] = lease_book.sync_request(140).asks
        assert (ask.scope, ask.key_id) == (KEY_SCOPE, "k1")


def test_a_rescoped_key_asks_a_lease_of_its_own_and_the_user_asks_again() -> None:
    # Quota's list did not name kb yet; quota's own check in the ask does.
    lease_book = knowing()
    lease_book.admit("k0", "u1", BOUND, 100)
    lease_book.admit("kb", "u1", BOUND, 110)
    [ask] = lease_book.sync_request(120).asks
    assert (ask.scope, ask.key_id) == (USER_SCOPE, "kb")
    lease_book.apply(SyncAnswer((Grant(ask.lease_id, RESCOPE),)), 120)
    assert lease_book.leases() == []
    # kb's next request asks for a lease of its own; the user's other keys ask for the shared one.
    assert lease_book.admit("kb", "u1", BOUND, 130) is None
    assert lease_book.admit("k2", "u1", BOUND, 140) is None
    asks = lease_book.sync_request(150).asks
    assert sorted((a.scope, a.key_id) for a in asks) == [(KEY_SCOPE, "kb"), (USER_SCOPE, "k2")]
    # It stays its own scope for valid_for_ms, by when quota's list names it; then it is forgotten.
    lease_book.apply(SyncAnswer(tuple(Grant(a.lease_id, "refused") for a in asks)), 150)
    lease_book.sync_request(150 + TERMS.valid_for_ms + TERMS.idle_ms)
    assert lease_book.remembered() == 0


def test_ten_thousand_rotating_keys_cost_one_scope_per_user() -> None:
    # Bench scenario 7's rotation: 10,000 keys over 5 users, about 500 requests a second.
    lease_book = knowing()
    granted: set[str] = set()
    exact = 0
    for index in range(10_000):
        at = 100 + index * 2
        if lease_book.admit(f"k{index}", f"u{index % 5}", BOUND, at) is None:
            exact += 1
        if lease_book.sync_due(at):
            request = lease_book.sync_request(at)
            grants = tuple(Grant(a.lease_id, OPEN, 10_000 * BOUND, TERMS.valid_for_ms) for a in request.asks)
            granted |= {a.lease_id for a in request.asks}
            reports = tuple(
                Grant(r.lease_id, OPEN, 10_000 * BOUND, TERMS.valid_for_ms) for r in request.reports
            )
            lease_book.apply(SyncAnswer(grants + reports), at)
    # Each user's first two requests, and those waiting for the first grant: then no exact request.
    assert exact <= 5 * 2 + 60, exact
    assert len(granted) == 5
    assert lease_book.remembered() == 5
