"""How ``relaygate admin`` shows an answer: a table of a listing, or field / value rows of one object.

Money (``*_micros``, prices per million tokens, per request, per image) is shown in units and in
micro-units, ``12.500000 (12,500,000 µ)``; ``*_at_ms`` times as UTC. ``--json`` prints the answer as
the API sent it instead.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from services.common.pricing import RATE_FIELDS

# Fields that hold money in micro-units besides the ``*_micros`` ones: the price book's rates.
_MONEY_FIELDS = frozenset(RATE_FIELDS)
_EMPTY: tuple[object, ...] = (None, "", "0", 0, False, [], {})
_MAX_CELL = 48
# Listing fields worth a column of their own when the API answers with many; the rest stay in --json.
_MAX_COLUMNS = 8


def money(micros: int) -> str:
    """``12500000`` -> ``12.500000 (12,500,000 µ)``: exact, no floating point."""
    sign = "-" if micros < 0 else ""
    whole, fraction = divmod(abs(micros), 1_000_000)
    return f"{sign}{whole:,}.{fraction:06d} ({micros:,} µ)"


def is_money(name: str) -> bool:
    return name.endswith("_micros") or name in _MONEY_FIELDS


def _integer(value: Any) -> int | None:
    """Protobuf's JSON writes 64-bit integers as strings."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    return None


def cell(name: str, value: Any) -> str:
    """One value as shown in a table."""
    number = _integer(value)
    if number is not None and is_money(name):
        return money(number)
    if number is not None and name.endswith("_at_ms") and number > 0:
        return dt.datetime.fromtimestamp(number / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%fZ")[:-4] + "Z"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(cell(name, item) for item in value)
    if isinstance(value, dict):
        return " ".join(f"{k}={cell(k, v)}" for k, v in value.items() if v not in _EMPTY)
    return "" if value is None else str(value)


def _clip(text: str) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= _MAX_CELL else text[: _MAX_CELL - 1] + "…"


def grid(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


def _listing(body: dict[str, Any]) -> tuple[str, list[dict[str, Any]]] | None:
    """The answer's list of objects, when it is a listing."""
    found = [(k, v) for k, v in body.items() if isinstance(v, list) and all(isinstance(i, dict) for i in v)]
    return found[0] if len(found) == 1 else None


def _flatten(body: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for name, value in body.items():
        if isinstance(value, dict) and value:
            rows += _flatten(value, f"{prefix}{name}.")
            continue
        rows.append((prefix + name, value))
    return rows


def render(body: dict[str, Any]) -> str:
    """The answer as text: a table for a listing, field / value rows for one object."""
    listing = _listing(body)
    if listing is None:
        rows = [[name, _clip(cell(name.rsplit(".", 1)[-1], value))] for name, value in _flatten(body)]
        return grid(["field", "value"], rows) if rows else "(empty)"
    name, items = listing
    if not items:
        return f"no {name}"
    columns: list[str] = []
    for item in items:
        for key, value in item.items():
            if key not in columns and not isinstance(value, dict | list) and len(columns) < _MAX_COLUMNS:
                columns.append(key)
    # Columns empty in every row tell nothing.
    columns = [c for c in columns if any(item.get(c) not in _EMPTY for item in items)]
    table = grid(columns, [[_clip(cell(c, item.get(c))) for c in columns] for item in items])
    rest = {k: v for k, v in body.items() if k != name and v not in _EMPTY}
    footer = [f"{k}: {cell(k, v)}" for k, v in rest.items()]
    return "\n".join([table, f"({len(items)} {name})", *footer])
