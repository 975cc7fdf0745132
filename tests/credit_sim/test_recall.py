"""Quota's recall for the exact path, in the books themselves: a reserve is told to wait only when the
leases it recalls can make the room it lacks."""

from __future__ import annotations

from services.common.credit import CreditTerms, LeaseAsk, ReserveAsk, SyncRequest
from services.quota.credit import CreditBooks

TERMS = CreditTerms()


def _windows_of(key_id: str, _user: str) -> tuple[str, ...]:
    return ("day:k1",) if key_id == "k1" else ()


def books_with_leases(*keys: str) -> CreditBooks:
    """User u1 with 10,000 and a daily budget of 1,000 on key k1; one lease per key in ``keys``."""
    books = CreditBooks(TERMS, _windows_of)
    books.top_up("u1", 10_000)
    books.set_cap("day:k1", 1_000)
    for index, key_id in enumerate(keys):
        request = SyncRequest("r1", index + 1, asks=(LeaseAsk(f"L-{key_id}", key_id, "u1", 400, 10),))
        [grant] = books.sync(request, now=0).grants
        assert grant.state == "open", grant
    assert books.problems() == []
    return books


def test_a_key_out_of_budget_is_refused_at_once_when_only_other_keys_hold_leases() -> None:
    books = books_with_leases("k2")
    # k1's day is all but spent on exact reservations; the balance has plenty.
    assert books.reserve(ReserveAsk("R1", "k1", "u1", 990), now=0).state == "held"
    answer = books.reserve(ReserveAsk("R2", "k1", "u1", 50), now=0)
    # k2's lease gives back to the balance, not to k1's day: recalling it cannot help.
    assert answer.state == "refused", answer
    assert not books.holds["L-k2"].recall


def test_only_the_leases_that_make_the_missing_room_are_recalled() -> None:
    books = books_with_leases("k1", "k2")
    held = books.windows["day:k1"].held
    assert books.reserve(ReserveAsk("R1", "k1", "u1", 1_000 - held), now=0).state == "held"
    answer = books.reserve(ReserveAsk("R2", "k1", "u1", 50), now=0)
    assert answer.state == "retry", answer
    assert books.holds["L-k1"].recall and not books.holds["L-k2"].recall


def test_the_balance_is_made_from_every_lease_of_the_user() -> None:
    books = books_with_leases("k1", "k2")
    available = books.accounts["u1"].available
    assert books.reserve(ReserveAsk("R1", "k3", "u1", available), now=0).state == "held"
    answer = books.reserve(ReserveAsk("R2", "k3", "u1", 500), now=0)
    assert answer.state == "retry", answer
    assert books.holds["L-k1"].recall and books.holds["L-k2"].recall
    # More than both leases' unused parts: refused at once.
    assert books.reserve(ReserveAsk("R3", "k3", "u1", 10_000), now=0).state == "refused"
