"""The gateway's errors in Anthropic's shape: ``{"type": "error", "error": {"type", "message"}}``.

Mapped once, from the HTTP status every :class:`~services.common.errors.GatewayError` already carries
(an upstream's error passed through keeps its status and its message), to the error types Anthropic
documents (https://docs.anthropic.com/en/api/errors)::

    400 invalid_request_error   401 authentication_error   403 permission_error
    404 not_found_error         413 request_too_large      429 rate_limit_error
    503/529 overloaded_error    any other 5xx api_error    any other 4xx invalid_request_error

The status itself is the gateway's (a spent balance stays a 429, as on the OpenAI endpoints).
"""

from __future__ import annotations

from typing import Any

from services.common.errors import GatewayError
from services.relay.formats.common import event, passthrough_message

__all__ = ["anthropic_error", "anthropic_error_event", "error_type"]

_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def error_type(status: int) -> str:
    found = _BY_STATUS.get(status)
    if found is not None:
        return found
    return "api_error" if status >= 500 else "invalid_request_error"


def _payload(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type(status), "message": message}}


def anthropic_error(exc: GatewayError) -> tuple[int, dict[str, Any]]:
    """The status and body of the answer for ``exc``."""
    status = exc.status
    return status, _payload(status, passthrough_message(exc))


def anthropic_error_event(exc: GatewayError) -> bytes:
    """``exc`` sent in-band once a stream has started (``event: error``)."""
    return event(b"error", _payload(exc.status, passthrough_message(exc)))
