"""The fields a service logged with ``extra={...}``, read off captured records with their type checked.

``logging.LogRecord`` declares none of them (they are set as attributes when the record is made), so a
test reads them here rather than as attributes the type checker cannot see.
"""

from __future__ import annotations

import logging
from typing import TypeVar

T = TypeVar("T")


def extra(record: logging.LogRecord, name: str, kind: type[T]) -> T:
    """``record``'s ``name`` field; an ``AssertionError`` when the record has none or it is no ``kind``."""
    assert name in record.__dict__, f"{record.msg!r} was logged without {name!r}"
    value = record.__dict__[name]
    assert isinstance(value, kind), f"{name}={value!r} is not a {kind.__name__}"
    return value
