"""Lease scopes in quota's books: a user-scope lease holds on the user's windows only, is charged by
any key of the user, and is never granted to a key with a budget of its own."""

from __future__ import annotations

from services.common.credit import (
    KEY_SCOPE,
    RESCOPE,
    USER_SCOPE,
    Charge,
    CreditTerms,
    LeaseAsk,
    ReserveAsk,
    SyncRequest,
)
from services.quota.credit import CreditBooks

TERMS = CreditTerms()


def _windows_of(key_id: str, user_id: str) -> tuple[str, ...]:
    # kb has a daily budget of its own; u1 has one too.
    own = ("day:kb",) if key_id == "kb" else ()
    return (*own, f"day:{user_id}")


def _recalled(credit: CreditBooks, lease_id: str) -> bool:
    # Read through a call: an attribute read inline stays narrowed by the earlier assert, and the
    # reserve in between (which flips it) is invisible to the type checker.
    return credit.holds[lease_id].recall


def books() -> CreditBooks:
    books = CreditBooks(TERMS, _windows_of)
    books.top_up("u1", 10_000)
    books.set_cap("day:kb", 500)
    books.set_cap("day:u1", 8_000)
    return books


def test_a_user_scope_lease_holds_the_users_windows_and_any_key_of_the_user_charges_it() -> None:
    credit = books()
    ask = LeaseAsk("L1", "k1", "u1", 2_000, 10, USER_SCOPE)
    [grant] = credit.sync(SyncRequest("r1", 1, asks=(ask,)), now=0).grants
    assert grant.state == "open", grant
    hold = credit.holds["L1"]
    assert (hold.key_id, hold.windows) == ("", ("day:u1",))
    assert credit.windows["day:u1"].held == hold.granted == credit.accounts["u1"].held
    # Requests of three different keys, each charged on the shared lease.
    for index, key_id in enumerate(("k1", "k2", "k3")):
        credit.charge(Charge(f"q{index}", "L1", key_id, "u1", 100))
    assert hold.applied == 300 and credit.windows["day:u1"].spent == 300
    assert credit.accounts["u1"].balance == 9_700
    assert credit.problems() == []


def test_a_key_with_a_budget_of_its_own_is_told_to_ask_a_lease_of_its_own() -> None:
    credit = books()
    shared = LeaseAsk("L1", "kb", "u1", 2_000, 10, USER_SCOPE)
    [grant] = credit.sync(SyncRequest("r1", 1, asks=(shared,)), now=0).grants
    assert grant.state == RESCOPE
    assert "L1" not in credit.holds and credit.accounts["u1"].held == 0
    own = LeaseAsk("L2", "kb", "u1", 2_000, 10, KEY_SCOPE)
    [grant] = credit.sync(SyncRequest("r1", 2, asks=(own,)), now=0).grants
    assert grant.state == "open"
    assert credit.holds["L2"].windows == ("day:kb", "day:u1")
    assert credit.holds["L2"].granted <= 500


def test_a_user_lease_is_recalled_for_the_balance_and_the_users_window_not_a_keys() -> None:
    credit = books()
    [grant] = credit.sync(
        SyncRequest("r1", 1, asks=(LeaseAsk("L1", "k1", "u1", 5_000, 10, USER_SCOPE),)), now=0
    ).grants
    assert grant.state == "open"
    # kb's day is spent on exact reservations: the shared lease does not give back to kb's window.
    assert credit.reserve(ReserveAsk("R1", "kb", "u1", 500), now=0).state == "held"
    assert credit.reserve(ReserveAsk("R2", "kb", "u1", 10), now=0).state == "refused"
    assert not _recalled(credit, "L1")
    # Another key needing the user's room the lease holds: recalled.
    room = min(credit.accounts["u1"].available, credit.windows["day:u1"].room)
    assert credit.reserve(ReserveAsk("R3", "k2", "u1", room + 10), now=0).state == "retry"
    assert _recalled(credit, "L1")
    assert credit.problems() == []
