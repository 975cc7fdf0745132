"""The console as an ASGI application: its pages and assets, its session, and the forwarding of its
API calls to the admin API (see the package docstring for the design)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

import orjson

from services.common.errors import (
    AuthenticationError,
    GatewayError,
    InvalidRequest,
    NotFound,
    PermissionDenied,
)
from services.common.scopes import ADMIN_READ
from services.console import session
from services.console.assets import load_assets

PREFIX = "/console"
_ADMIN_PREFIX = "/admin/v1/"
_API_PREFIX = f"{PREFIX}/api/"
_STATIC_PREFIX = f"{PREFIX}/static/"
_SESSION_PATH = f"{PREFIX}/session"
# An admin key and one flag: anything larger is not a sign-in.
_MAX_SIGN_IN_BYTES = 4096
# Headers the page sends that the admin API must not see (the token goes as the bearer credential).
_DROPPED = frozenset({b"cookie", b"authorization", session.CSRF_HEADER})
# Also replaced when the console makes a call of its own (the sign-in's token exchange).
_BODY_HEADERS = frozenset({b"content-type", b"content-length", b"transfer-encoding"})

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_SECURITY_HEADERS: session.Headers = [
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


class Console:
    """Serves ``/console`` and everything under it; ``admin`` is the ASGI app serving ``/admin/v1``."""

    def __init__(self, admin: ASGIApp) -> None:
        self._admin = admin
        self._assets = load_assets()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        try:
            if path.startswith(_API_PREFIX):
                await self._forward(path.removeprefix(_API_PREFIX), scope, receive, send)
            elif path == _SESSION_PATH:
                await self._session(method, scope, receive, send)
            elif method not in session.SAFE_METHODS:
                raise NotFound(f"No console page at {method} {path}.")
            elif path == PREFIX:
                await _respond(send, 308, b"", extra=[(b"location", b"/console/")])
            elif path == f"{PREFIX}/":
                await self._asset("index.html", method, send)
            elif path.startswith(_STATIC_PREFIX):
                await self._asset(path.removeprefix(_STATIC_PREFIX), method, send)
            else:
                raise NotFound(f"No console page at {path}.")
        except GatewayError as exc:
            await _respond(send, exc.status, orjson.dumps(exc.to_openai()), b"application/json")

    async def _asset(self, name: str, method: str, send: Send) -> None:
        asset = self._assets.get(name)
        if asset is None:
            raise NotFound(f"No console file {name!r}.")
        # Revalidated on each load: a relay upgrade must not leave an old page talking to a new API.
        extra = [(b"cache-control", b"no-cache")]
        body = b"" if method == "HEAD" else asset.body
        await _respond(send, 200, body, asset.content_type, extra=extra, length=len(asset.body))

    async def _session(self, method: str, scope: Scope, receive: Receive, send: Send) -> None:
        headers: session.Headers = scope["headers"]
        secure = _over_https(scope)
        jar = session.cookies(headers)
        if method == "GET":
            info = session.session_info(jar.get(session.TOKEN_COOKIE, ""))
            if info is None:
                raise AuthenticationError("Not signed in.")
            await _respond(send, 200, info.as_json(), b"application/json")
        elif method == "POST":
            if not _same_origin(headers):
                raise PermissionDenied("Sign in from the console's own page.")
            await self._sign_in(scope, receive, send, secure=secure)
        elif method == "DELETE":
            if not session.csrf_ok(method, headers, jar):
                raise PermissionDenied("The request lacks the console's CSRF token.")
            await self._sign_out(scope, send, jar.get(session.TOKEN_COOKIE, ""), secure=secure)
        else:
            raise NotFound(f"No console page at {method} {_SESSION_PATH}.")

    async def _sign_in(self, scope: Scope, receive: Receive, send: Send, *, secure: bool) -> None:
        form = _sign_in_form(await _read_body(receive, _MAX_SIGN_IN_BYTES))
        key, read_only = form
        # The lifetime asked for; auth grants at most its RELAYGATE_ADMIN_TOKEN_MAX_TTL_S.
        request: dict[str, Any] = {"ttl_seconds": session.SESSION_TTL_S}
        if read_only:
            request["scopes"] = [ADMIN_READ]
        body = orjson.dumps(request)
        status, answer = await self._call_admin(scope, "POST", "tokens", key, body)
        if status != 201:
            # The admin API's own refusal (wrong key, not an admin, address not allowed), as it said it.
            await _respond(send, status, answer, b"application/json")
            return
        token = str(orjson.loads(answer)["token"])
        info = session.session_info(token)
        if info is None:
            raise GatewayError("The admin API issued a token the console cannot read.")
        lifetime = max(0, info.expires_at - int(time.time()))
        cookies = session.open_session(token, lifetime_s=lifetime, secure=secure)
        await _respond(send, 200, info.as_json(), b"application/json", extra=cookies)

    async def _sign_out(self, scope: Scope, send: Send, token: str, *, secure: bool) -> None:
        """End the session's token at auth, not only its cookies: a copy of the token (another tab, a
        leaked cookie) is refused from then on. The cookies go whatever auth answered."""
        cleared = session.close_session(secure=secure)
        if not token:
            await _respond(send, 204, b"", extra=cleared)
            return
        status, answer = await self._call_admin(scope, "DELETE", "tokens", token, b"")
        if status == 200:
            await _respond(send, 204, b"", extra=cleared)
        else:
            # Signed out of this browser all the same; the page says the token lives until it expires.
            await _respond(send, status, answer, b"application/json", extra=cleared)

    async def _forward(self, route: str, scope: Scope, receive: Receive, send: Send) -> None:
        """``/console/api/<route>`` as ``/admin/v1/<route>`` with the session's token as the bearer."""
        if not route or route.startswith("tokens") or any(p in ("", ".", "..") for p in route.split("/")):
            raise NotFound(f"The console does not forward {route!r}.")
        headers: session.Headers = scope["headers"]
        jar = session.cookies(headers)
        token = jar.get(session.TOKEN_COOKIE, "")
        if not token:
            raise AuthenticationError("Not signed in.")
        if not session.csrf_ok(scope["method"], headers, jar):
            raise PermissionDenied("The request lacks the console's CSRF token.")
        forwarded = _with_bearer(headers, token, drop=_DROPPED)
        path = _ADMIN_PREFIX + route
        inner = dict(scope, path=path, raw_path=path.encode(), headers=forwarded, root_path="")

        async def no_store(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = dict(
                    message, headers=[*message.get("headers", []), (b"cache-control", b"no-store")]
                )
            await send(message)

        await self._admin(inner, receive, no_store)

    async def _call_admin(
        self, scope: Scope, method: str, route: str, credential: str, body: bytes
    ) -> tuple[int, bytes]:
        """One admin API call made by the console itself, with the caller's own headers (the admin
        API decides the client's address from them as for any call); its status and body."""
        path = _ADMIN_PREFIX + route
        headers = _with_bearer(scope["headers"], credential, drop=_DROPPED | _BODY_HEADERS)
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        inner = dict(scope, method=method, path=path, raw_path=path.encode(), headers=headers)
        inner.update(query_string=b"", root_path="")
        sent = False

        async def receive() -> Message:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        status = 500
        chunks: list[bytes] = []

        async def collect(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self._admin(inner, receive, collect)
        return status, b"".join(chunks)


def _with_bearer(headers: session.Headers, credential: str, *, drop: frozenset[bytes]) -> session.Headers:
    kept = [(k, v) for k, v in headers if k.lower() not in drop]
    kept.append((b"authorization", b"Bearer " + credential.encode("latin-1")))
    return kept


def _over_https(scope: Scope) -> bool:
    """Whether the browser reached us over HTTPS: our own scheme, or the origin the browser names (TLS
    usually ends at an ingress in front of the relay, which then sees plain HTTP)."""
    origin = session.header(scope["headers"], b"origin") or b""
    return scope.get("scheme") == "https" or origin.startswith(b"https://")


def _same_origin(headers: session.Headers) -> bool:
    origin = session.header(headers, b"origin")
    if origin is None:
        return True
    _, _, authority = origin.partition(b"://")
    return authority == (session.header(headers, b"host") or b"")


def _sign_in_form(raw: bytes) -> tuple[str, bool]:
    try:
        form = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest('Sign in with a JSON body {"key": "rg-..."}.') from None
    key = form.get("key") if isinstance(form, dict) else None
    if not isinstance(key, str) or not key.strip():
        raise InvalidRequest("An admin key is required.", param="key")
    if not (key.isascii() and key.strip().isprintable()):
        raise InvalidRequest("That is not an API key.", param="key")
    return key.strip(), bool(form.get("read_only", False))


async def _read_body(receive: Receive, limit: int) -> bytes:
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise InvalidRequest("The client went away.")
        body += message.get("body", b"")
        if len(body) > limit:
            raise InvalidRequest("The sign-in body is too large.")
        if not message.get("more_body", False):
            return bytes(body)


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes | None = None,
    *,
    extra: Sequence[tuple[bytes, bytes]] = (),
    length: int | None = None,
) -> None:
    headers = [*_SECURITY_HEADERS, (b"content-length", str(len(body) if length is None else length).encode())]
    if content_type is not None:
        headers.append((b"content-type", content_type))
    if content_type == b"application/json":
        headers.append((b"cache-control", b"no-store"))
    headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
