"""The only place that renders errors for HTTP clients, in OpenAI's shape:
``{"error": {"message", "type", "param", "code"}}`` with the status OpenAI would use.

Besides :mod:`services.common.errors`, three refusals exist only at the HTTP edge (they never cross
gRPC)::

    InvalidRequest
    ├── MethodNotAllowed   405 method_not_allowed  (with ``allow``)
    ├── RequestTimeout     408 request_timeout     (head or body too slow; the connection closes)
    └── HeadersTooLarge    431 headers_too_large   (too many or too large headers)
"""

from __future__ import annotations

import logging

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from services.common.errors import GatewayError, InvalidRequest
from services.relay.edge.http.requests import ClientGone

log = logging.getLogger(__name__)

# Where FastAPI says a parameter came from; the caller knows it by its name alone.
_LOCATIONS = frozenset({"body", "query", "path", "header", "cookie"})


class MethodNotAllowed(InvalidRequest):
    http_status = 405
    code = "method_not_allowed"


class RequestTimeout(InvalidRequest):
    http_status = 408
    code = "request_timeout"


class HeadersTooLarge(InvalidRequest):
    http_status = 431
    code = "headers_too_large"


def error_body(exc: GatewayError, *, request_id: str = "") -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """Status, body and headers of the answer for ``exc``.

    An upstream's own error body is passed through untouched when it already speaks OpenAI."""
    headers = [(b"content-type", b"application/json")]
    if request_id:
        headers.append((b"x-request-id", request_id.encode()))
    if exc.retry_after is not None:
        headers.append((b"retry-after", b"%d" % max(1, round(exc.retry_after))))
    # UpstreamStatus, and the proxy's UpstreamRejected, carry the upstream's own body.
    passthrough = getattr(exc, "body", None)
    if isinstance(passthrough, bytes) and _is_openai_error(passthrough):
        return exc.status, passthrough, headers
    return exc.status, orjson.dumps(exc.to_openai()), headers


def error_response(exc: GatewayError, *, request_id: str = "") -> Response:
    status, body, headers = error_body(exc, request_id=request_id)
    return Response(
        body,
        status_code=status,
        headers={k.decode(): v.decode() for k, v in headers if k != b"content-type"},
        media_type="application/json",
    )


def _is_openai_error(body: bytes) -> bool:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(parsed, dict) and isinstance(parsed.get("error"), dict)


def sse_error(exc: GatewayError) -> bytes:
    """An error sent in-band once a stream has started (the HTTP status is already on the wire)."""
    return b"data: " + orjson.dumps(exc.to_openai()) + b"\n\n"


def install(app: FastAPI) -> None:
    """Error handlers of the FastAPI part of the relay (the admin API, unknown paths)."""

    async def on_gateway_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, GatewayError)
        return error_response(exc, request_id=getattr(request.state, "request_id", ""))

    async def on_http_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
        body = {
            "error": {
                "message": str(exc.detail),
                "type": "invalid_request_error",
                "param": None,
                "code": code,
            }
        }
        return Response(
            orjson.dumps(body),
            status_code=exc.status_code,
            media_type="application/json",
            headers=exc.headers,
        )

    async def on_validation_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {}
        loc = tuple(first.get("loc", ()))
        where = ".".join(str(p) for p in (loc[1:] if loc and loc[0] in _LOCATIONS else loc))
        return error_response(
            InvalidRequest(f"{where}: {first.get('msg', 'invalid value')}", param=where or None)
        )

    async def on_client_gone(_request: Request, _exc: Exception) -> Response:
        # The client left (or was cut off for being too slow) mid-body: this answer is never sent.
        return error_response(RequestTimeout("The request body was not received."))

    async def on_crash(request: Request, exc: Exception) -> Response:
        log.error("unhandled error", exc_info=exc)
        return error_response(GatewayError(), request_id=getattr(request.state, "request_id", ""))

    app.add_exception_handler(GatewayError, on_gateway_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(ClientGone, on_client_gone)
    app.add_exception_handler(Exception, on_crash)
