"""Upstream credentials are write-only: which channel values are secret, and how they are shown.

A channel's ``api_key`` is always secret; so is a header value whose name mentions a credential
(``authorization``, ``api-key``, ``x-api-key``, ``x-goog-api-key``, anything with key, token, secret,
password, auth, cookie, session, signature or credential in it) or whose value carries an HTTP auth
scheme (``Bearer ...``, ``Basic ...``). The admin API shows those as :func:`mask` and never in plain text;
the relay's own catalog RPC still carries the real values.

A mask always contains :data:`MASK_MARK` (U+2026), which no usable credential can contain: HTTP header
values are Latin-1. So a masked value sent back unchanged (an edited copy of a listed channel) is
recognised, and quota keeps the stored credential (:func:`unmask`).
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["MASK_MARK", "is_masked", "is_secret_header", "mask", "mask_headers", "unmask"]

MASK_MARK = "\u2026"
_SECRET_NAME_PARTS = (
    "auth",
    "key",
    "token",
    "secret",
    "password",
    "passwd",
    "cookie",
    "session",
    "signature",
    "credential",
)
_AUTH_SCHEMES = ("bearer ", "basic ", "digest ", "token ")
# Shorter values show nothing of themselves; longer ones keep 3 + 4 characters, enough to tell keys apart.
_SHOW_ENDS_FROM = 24


def is_secret_header(name: str, value: str = "") -> bool:
    lowered = name.lower()
    if any(part in lowered for part in _SECRET_NAME_PARTS):
        return True
    return value.lower().startswith(_AUTH_SCHEMES)


def mask(value: str) -> str:
    """``sk-…wxyz`` for a long value, ``…`` for a short one, empty for empty."""
    if not value:
        return ""
    if len(value) < _SHOW_ENDS_FROM:
        return MASK_MARK
    return f"{value[:3]}{MASK_MARK}{value[-4:]}"


def is_masked(value: str) -> bool:
    return MASK_MARK in value


def mask_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {name: mask(v) if is_secret_header(name, v) else v for name, v in headers.items()}


def unmask(submitted: str, stored: str) -> str | None:
    """The value to keep: ``stored`` when ``submitted`` is its mask, ``submitted`` when it is not masked
    at all, ``None`` when it is some other mask (a copy from another channel, or an edited mask)."""
    if not is_masked(submitted):
        return submitted
    if stored and submitted == mask(stored):
        return stored
    return None
