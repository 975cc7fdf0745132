"""Budgets written through the admin API's key and user routes.

Spending caps have one owner, quota's budgets (``PUT /admin/v1/budgets/{scope}/{id}/{period}``). Operators
coming from LiteLLM or new-api set a key's budget where they create the key, so the key and user routes
keep accepting ``limits.daily_budget_micros`` and ``limits.monthly_budget_micros``: they are taken out
of the body before it reaches auth (whose ``Limits`` hold only rate and concurrency limits) and written
to quota with ``SetBudget`` once auth has the key or user. The answer shows the budgets in force under
the same names, read back from quota. A field present sets the budget (0 removes it); a field absent
leaves the budget as it is, so changing a key's RPM never drops its spending cap.
"""

from __future__ import annotations

from typing import Any

from services.common.errors import InvalidRequest
from services.common.grpc import call
from services.common.pb.relaygate.quota.v1 import quota_pb2
from services.relay.pipeline.gateway import Gateway

__all__ = ["BUDGET_FIELDS", "read_budgets", "show_budgets", "take_budgets", "write_budgets"]

# Field of the admin API's ``limits`` -> budget period.
BUDGET_FIELDS = {"daily_budget_micros": "day", "monthly_budget_micros": "month"}
# Quota's bound on a budget (``services.quota.budgets``), checked here before auth is asked, so a
# refused budget never leaves a key or user created without it.
MAX_BUDGET_MICROS = 10**15


def _micros(param: str, value: Any) -> int:
    """Read as protobuf's JSON parser reads an int64 (the rest of the body is parsed by it): a number
    with no fractional part, the same as a string, or null for 0."""
    if value is None:
        return 0
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidRequest(f"{param} must be an integer number of micro-units.", param=param)
    try:
        micros = int(value)
    except ValueError:
        raise InvalidRequest(f"{param} must be an integer number of micro-units.", param=param) from None
    if not 0 <= micros <= MAX_BUDGET_MICROS:
        raise InvalidRequest(
            f"{param} must be between 0 and {MAX_BUDGET_MICROS} (got {micros}).", param=param
        )
    return micros


def take_budgets(body: dict[str, Any]) -> dict[str, int]:
    """Remove the budget fields from ``body["limits"]``; returns ``{period: micros}`` of those present."""
    limits = body.get("limits")
    if not isinstance(limits, dict):
        return {}
    found: dict[str, int] = {}
    for name, period in BUDGET_FIELDS.items():
        if name in limits:
            found[period] = _micros(f"limits.{name}", limits.pop(name))
    return found


async def write_budgets(
    gateway: Gateway, scope: str, scope_id: str, budgets: dict[str, int], actor: str
) -> None:
    for period, micros in sorted(budgets.items()):
        message = quota_pb2.SetBudgetRequest(
            scope=scope, scope_id=scope_id, period=period, limit_micros=micros, actor=actor
        )
        await call(gateway.quota.SetBudget, message, timeout=gateway.settings.rpc_timeout_s)


async def read_budgets(gateway: Gateway, scope: str, scope_id: str) -> dict[str, int]:
    """``{period: micros}`` of the key's or user's budgets, read on quota's primary (after a write)."""
    message = quota_pb2.GetBudgetsRequest(scope=scope, scope_id=scope_id, consistent=True)
    listing = await call(gateway.quota.GetBudgets, message, timeout=gateway.settings.rpc_timeout_s)
    return {status.period: int(status.limit_micros) for status in listing.budgets}


def show_budgets(rendered: dict[str, Any], budgets: dict[str, int]) -> None:
    """Put ``budgets`` into a rendered key's or user's ``limits``, as the operator wrote them (int64
    as a string, like every int64 of the protobuf JSON form)."""
    limits = rendered.setdefault("limits", {})
    for name, period in BUDGET_FIELDS.items():
        limits[name] = str(budgets.get(period, 0))
