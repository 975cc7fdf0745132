"""The console's session: the admin token in an HttpOnly cookie, the CSRF token beside it, and the
checks a request must pass before the console forwards it to the admin API."""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from typing import Any

import orjson

TOKEN_COOKIE = "rg_console_token"
CSRF_COOKIE = "rg_console_csrf"
CSRF_HEADER = b"x-console-csrf"
# Both cookies are sent to the console's own paths only, never to the OpenAI or admin routes.
COOKIE_PATH = "/console/"
SAFE_METHODS = frozenset({"GET", "HEAD"})
# The admin token lifetime a sign-in asks for: a working day, as other gateways' consoles keep their
# sessions. Auth caps it at RELAYGATE_ADMIN_TOKEN_MAX_TTL_S (1 h by default); signing out ends the token.
SESSION_TTL_S = 8 * 3600

Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """What the page may know of its session (never the token): who, which scopes, until when."""

    user_id: str
    scopes: tuple[str, ...]
    expires_at: int

    def as_json(self) -> bytes:
        return orjson.dumps({"user_id": self.user_id, "scopes": self.scopes, "expires_at": self.expires_at})


def header(headers: Headers, name: bytes) -> bytes | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def cookies(headers: Headers) -> dict[str, str]:
    jar: SimpleCookie = SimpleCookie()
    for key, value in headers:
        if key.lower() == b"cookie":
            try:
                jar.load(value.decode("latin-1"))
            except CookieError:
                continue
    return {name: morsel.value for name, morsel in jar.items()}


def _cookie(name: str, value: str, *, http_only: bool, secure: bool, max_age: int | None) -> bytes:
    parts = [f"{name}={value}", f"Path={COOKIE_PATH}", "SameSite=Strict"]
    if http_only:
        parts.append("HttpOnly")
    if secure:
        parts.append("Secure")
    if max_age is not None:
        parts.append(f"Max-Age={max_age}")
    return "; ".join(parts).encode()


def open_session(token: str, *, lifetime_s: int, secure: bool) -> Headers:
    """``Set-Cookie`` headers for a new session; the cookies end when the token does."""
    csrf = secrets.token_urlsafe(32)
    return [
        (b"set-cookie", _cookie(TOKEN_COOKIE, token, http_only=True, secure=secure, max_age=lifetime_s)),
        (b"set-cookie", _cookie(CSRF_COOKIE, csrf, http_only=False, secure=secure, max_age=lifetime_s)),
    ]


def close_session(*, secure: bool) -> Headers:
    return [
        (b"set-cookie", _cookie(name, "", http_only=name == TOKEN_COOKIE, secure=secure, max_age=0))
        for name in (TOKEN_COOKIE, CSRF_COOKIE)
    ]


def csrf_ok(method: str, headers: Headers, jar: dict[str, str]) -> bool:
    """A write must echo the CSRF cookie in its header and, when the browser names its origin, come
    from the host it is sent to."""
    if method in SAFE_METHODS:
        return True
    expected = jar.get(CSRF_COOKIE, "")
    sent = (header(headers, CSRF_HEADER) or b"").decode("latin-1")
    if not expected or not hmac.compare_digest(expected, sent):
        return False
    origin = header(headers, b"origin")
    if origin is None:
        return True
    host = header(headers, b"host") or b""
    _, _, authority = origin.partition(b"://")
    return bool(host) and authority == host


def session_info(token: str) -> SessionInfo | None:
    """The token's claims as the page may show them. Read without checking the signature: they only
    decide what the page offers; the admin API verifies the token on every call."""
    try:
        payload_b64 = token.split(".")[1]
        payload: Any = orjson.loads(base64.urlsafe_b64decode(payload_b64 + "=" * (-len(payload_b64) % 4)))
        return SessionInfo(
            user_id=str(payload["sub"]),
            scopes=tuple(str(payload.get("scope", "")).split()),
            expires_at=int(payload["exp"]),
        )
    except (IndexError, KeyError, TypeError, ValueError, binascii.Error, orjson.JSONDecodeError):
        return None
