"""The relay's lease book on its own (no I/O): when it asks for leases, when a sync goes early, and
what it remembers of quiet keys."""

from __future__ import annotations

from services.common.credit import CreditTerms, Grant, SyncAnswer
from services.relay.credit import OPEN, LeaseBook, recall_wait_ms

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
