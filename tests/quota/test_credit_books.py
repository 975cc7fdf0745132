"""CreditBooks built from stored rows, as the services build them for each transaction."""

from __future__ import annotations

from services.common.credit import LEASE, CreditTerms
from services.quota.credit import CLOSED, EXPIRED, OPEN, Account, CreditBooks, Hold


def _no_windows(_key: str, _user: str) -> tuple[str, ...]:
    return ()


def test_books_built_with_holds_know_which_are_active() -> None:
    lease = Hold("l1", LEASE, "k1", "u1", (), expires_at=1_000, relay_id="r1", state=OPEN, granted=500)
    done = Hold("l2", LEASE, "k1", "u1", (), expires_at=1_000, relay_id="r1", state=CLOSED)
    books = CreditBooks(
        CreditTerms(), _no_windows, accounts={"u1": Account(1_000, 500)}, holds={"l1": lease, "l2": done}
    )
    assert [h.hold_id for h in books.active_holds()] == ["l1"]
    assert [h.hold_id for h in books.expire(2_000)] == ["l1"]
    assert lease.state == CLOSED and lease.expired
    assert books.accounts["u1"].held == 0
    assert books.problems() == []


def test_an_expired_lease_loaded_from_rows_keeps_its_reported_use_until_the_horizon() -> None:
    lease = Hold(
        "l1",
        LEASE,
        "k1",
        "u1",
        (),
        expires_at=1_000,
        relay_id="r1",
        state=EXPIRED,
        granted=300,
        used_reported=300,
    )
    lease.expired = True
    books = CreditBooks(CreditTerms(), _no_windows, accounts={"u1": Account(1_000, 300)}, holds={"l1": lease})
    assert books.problems() == []
    assert [h.hold_id for h in books.expire(2_000)] == ["l1"]
    assert (lease.state, books.accounts["u1"].held) == (CLOSED, 0)
