"""The budget fields of the admin API's key and user bodies, read as protobuf's JSON parser reads int64."""

from __future__ import annotations

from typing import Any

import pytest

from services.common.errors import InvalidRequest
from services.relay.edge.http.admin_budgets import show_budgets, take_budgets


@pytest.mark.parametrize(
    ("value", "micros"),
    [(5, 5), ("5000000", 5_000_000), (7.0, 7), (None, 0), (0, 0), (10**15, 10**15)],
)
def test_budget_fields_are_taken_out_of_the_limits(value: Any, micros: int) -> None:
    body: dict[str, Any] = {"name": "k", "limits": {"rpm": 3, "monthly_budget_micros": value}}
    assert take_budgets(body) == {"month": micros}
    assert body == {"name": "k", "limits": {"rpm": 3}}


@pytest.mark.parametrize("value", [-1, 10**15 + 1, "lots", "1.5", 2.5, True, [], {}, float("inf")])
def test_a_budget_quota_would_refuse_is_refused_here(value: Any) -> None:
    with pytest.raises(InvalidRequest) as refused:
        take_budgets({"limits": {"daily_budget_micros": value}})
    assert refused.value.param == "limits.daily_budget_micros"


def test_bodies_without_budgets_are_left_alone() -> None:
    for body in ({}, {"limits": {"rpm": 1}}, {"limits": "not an object"}):
        before = repr(body)
        assert take_budgets(body) == {}
        assert repr(body) == before


def test_budgets_are_shown_under_the_names_operators_wrote() -> None:
    key: dict[str, Any] = {"key_id": "key_1", "limits": {"rpm": "3"}}
    show_budgets(key, {"day": 900})
    assert key["limits"] == {"rpm": "3", "daily_budget_micros": "900", "monthly_budget_micros": "0"}
