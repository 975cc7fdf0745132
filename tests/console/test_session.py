"""The console's session cookies and CSRF check, without a browser."""

from __future__ import annotations

import base64

import orjson
import pytest

from services.console import session


def _token(payload: dict[str, object]) -> str:
    body = base64.urlsafe_b64encode(orjson.dumps(payload)).rstrip(b"=").decode()
    return f"eyJhbGciOiJIUzI1NiJ9.{body}.signature"


@pytest.mark.parametrize("secure", [True, False])
def test_cookies_are_http_only_strict_and_secure_over_https(secure: bool) -> None:
    token_cookie, csrf_cookie = (
        v.decode() for _, v in session.open_session("tok", lifetime_s=900, secure=secure)
    )
    assert token_cookie.startswith("rg_console_token=tok;")
    for cookie in (token_cookie, csrf_cookie):
        assert "Path=/console/" in cookie and "SameSite=Strict" in cookie and "Max-Age=900" in cookie
        assert ("Secure" in cookie.split("; ")) is secure
    assert "HttpOnly" in token_cookie.split("; ")
    # The page reads the CSRF token to echo it; it never reads the admin token.
    assert "HttpOnly" not in csrf_cookie.split("; ")
    for _, cleared in session.close_session(secure=secure):
        assert b"Max-Age=0" in cleared


def test_csrf_needs_the_echoed_token_and_the_same_origin() -> None:
    jar = {session.CSRF_COOKIE: "abc"}
    host = [(b"host", b"relay.example:8080")]
    assert session.csrf_ok("GET", host, {})
    assert not session.csrf_ok("POST", host, jar)
    assert not session.csrf_ok("POST", [*host, (b"x-console-csrf", b"abd")], jar)
    assert not session.csrf_ok("POST", [*host, (b"x-console-csrf", b"")], {})
    assert session.csrf_ok("POST", [*host, (b"x-console-csrf", b"abc")], jar)
    same = [*host, (b"x-console-csrf", b"abc"), (b"origin", b"https://relay.example:8080")]
    assert session.csrf_ok("DELETE", same, jar)
    other = [*host, (b"x-console-csrf", b"abc"), (b"origin", b"https://evil.example")]
    assert not session.csrf_ok("PATCH", other, jar)


def test_session_info_reads_the_claims_and_nothing_else() -> None:
    info = session.session_info(_token({"sub": "usr_1", "scope": "admin:read admin:write", "exp": 99}))
    assert info == session.SessionInfo("usr_1", ("admin:read", "admin:write"), 99)
    assert b"token" not in info.as_json()
    for broken in (
        "",
        "not-a-jwt",
        "a.!!!.c",
        _token({"scope": "admin:read"}),
        _token({"sub": "u", "exp": "x"}),
    ):
        assert session.session_info(broken) is None


def test_cookies_parse_and_survive_garbage() -> None:
    headers = [(b"cookie", b"rg_console_token=t1; other=x"), (b"cookie", b'bad"cookie')]
    assert session.cookies(headers)["rg_console_token"] == "t1"
