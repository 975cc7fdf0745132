"""The one error tree of relaygate, and its wire forms.

Every failure the gateway reports is a :class:`GatewayError`. Each class knows its HTTP status, its
OpenAI ``type`` and ``code``, its gRPC status, and whose fault it was (``caller``, ``policy``, ``provider``
or ``gateway``)::

    GatewayError                       500 api_error            gateway
    ├── InvalidRequest                 400 invalid_request_error caller
    │   ├── ModelNotFound              404 model_not_found       caller
    │   ├── NotFound                   404 not_found             caller
    │   ├── Conflict                   409 conflict              caller
    │   └── PayloadTooLarge            413 payload_too_large     caller
    ├── AuthenticationError            401 invalid_api_key       caller
    ├── PermissionDenied               403 permission_denied     policy
    ├── QuotaError                     429                       policy
    │   ├── InsufficientQuota          429 insufficient_quota
    │   ├── BudgetExceeded             429 budget_exceeded
    │   ├── RateLimited                429 rate_limit_exceeded   (retry_after)
    │   ├── ConcurrencyLimited         429 concurrency_limit_exceeded (retry_after)
    │   └── CreditRecalled             429 credit_recalled       (retry_after)
    ├── UpstreamError                  502 upstream_error        provider
    │   ├── UpstreamTimeout            504 upstream_timeout      provider
    │   ├── UpstreamStatus             the upstream's status     provider
    │   └── NoUpstreamAvailable        503 no_upstream_available provider
    └── ServiceUnavailable             503 service_unavailable   gateway

gRPC carries the class through the status code plus the ``relaygate-error`` trailing metadata (the
``code`` below), so the receiving side rebuilds the same class with :func:`from_wire`.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import grpc

Fault = Literal["caller", "policy", "provider", "gateway"]


class GatewayError(Exception):
    http_status: ClassVar[int] = 500
    type: ClassVar[str] = "api_error"
    code: ClassVar[str] = "internal_error"
    grpc_status: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    fault: ClassVar[Fault] = "gateway"

    def __init__(
        self,
        message: str | None = None,
        *,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.message = message or self.default_message()
        self.param = param
        self.retry_after = retry_after
        super().__init__(self.message)

    @classmethod
    def default_message(cls) -> str:
        return "The gateway failed to process the request."

    @property
    def status(self) -> int:
        return self.http_status

    def to_openai(self) -> dict[str, object]:
        """The body OpenAI clients expect: ``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class InvalidRequest(GatewayError):
    http_status = 400
    type = "invalid_request_error"
    code = "invalid_request"
    grpc_status = grpc.StatusCode.INVALID_ARGUMENT
    fault = "caller"


class ModelNotFound(InvalidRequest):
    http_status = 404
    code = "model_not_found"
    grpc_status = grpc.StatusCode.NOT_FOUND


class NotFound(InvalidRequest):
    http_status = 404
    code = "not_found"
    grpc_status = grpc.StatusCode.NOT_FOUND


class Conflict(InvalidRequest):
    http_status = 409
    code = "conflict"
    grpc_status = grpc.StatusCode.ALREADY_EXISTS


class PayloadTooLarge(InvalidRequest):
    http_status = 413
    code = "payload_too_large"


class AuthenticationError(GatewayError):
    http_status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"
    grpc_status = grpc.StatusCode.UNAUTHENTICATED
    fault = "caller"

    @classmethod
    def default_message(cls) -> str:
        return "Incorrect API key provided."


class PermissionDenied(GatewayError):
    http_status = 403
    type = "permission_error"
    code = "permission_denied"
    grpc_status = grpc.StatusCode.PERMISSION_DENIED
    fault = "policy"


class QuotaError(GatewayError):
    http_status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"
    grpc_status = grpc.StatusCode.RESOURCE_EXHAUSTED
    fault = "policy"


class InsufficientQuota(QuotaError):
    @classmethod
    def default_message(cls) -> str:
        return "You exceeded your current quota: the balance cannot cover this request."


class BudgetExceeded(QuotaError):
    code = "budget_exceeded"


class RateLimited(QuotaError):
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class ConcurrencyLimited(QuotaError):
    type = "rate_limit_error"
    code = "concurrency_limit_exceeded"


class CreditRecalled(QuotaError):
    """The balance or a budget cannot cover this request now, but leases of the same user hold unused
    credit that quota has just recalled: retry after ``retry_after`` (about two relay syncs)."""

    type = "rate_limit_error"
    code = "credit_recalled"

    @classmethod
    def default_message(cls) -> str:
        return "Credit held for other requests of this user is being returned; retry shortly."


class UpstreamError(GatewayError):
    http_status = 502
    type = "api_error"
    code = "upstream_error"
    grpc_status = grpc.StatusCode.UNAVAILABLE
    fault = "provider"

    @classmethod
    def default_message(cls) -> str:
        return "The upstream provider failed to answer."


class UpstreamTimeout(UpstreamError):
    http_status = 504
    code = "upstream_timeout"
    grpc_status = grpc.StatusCode.DEADLINE_EXCEEDED


class UpstreamStatus(UpstreamError):
    """The upstream answered with an error status; it is passed through to the caller."""

    code = "upstream_status"

    def __init__(self, message: str | None = None, *, status: int, body: bytes = b"") -> None:
        super().__init__(message or f"The upstream provider answered with status {status}.")
        self.upstream_status = status
        self.body = body

    @property
    def status(self) -> int:
        return self.upstream_status


class NoUpstreamAvailable(UpstreamError):
    http_status = 503
    code = "no_upstream_available"


# A component that is restarting, draining or failing over is back within seconds.
UNAVAILABLE_RETRY_AFTER_S = 1.0


class ServiceUnavailable(GatewayError):
    """A gateway component (a service, its database) cannot answer now; always says when to retry."""

    http_status = 503
    code = "service_unavailable"
    grpc_status = grpc.StatusCode.UNAVAILABLE

    def __init__(
        self, message: str | None = None, *, param: str | None = None, retry_after: float | None = None
    ) -> None:
        if retry_after is None:
            retry_after = UNAVAILABLE_RETRY_AFTER_S
        super().__init__(message, param=param, retry_after=retry_after)

    @classmethod
    def default_message(cls) -> str:
        return "A gateway component is unavailable; the request was not processed."


def _registry() -> dict[str, type[GatewayError]]:
    # Breadth first, so a subclass that shares its parent's code (InsufficientQuota) wins.
    found: dict[str, type[GatewayError]] = {}
    pending: list[type[GatewayError]] = [GatewayError]
    while pending:
        cls = pending.pop(0)
        found[cls.code] = cls
        pending.extend(cls.__subclasses__())
    return found


_BY_CODE = _registry()

_BY_GRPC_STATUS: dict[grpc.StatusCode, type[GatewayError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: Conflict,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: QuotaError,
    grpc.StatusCode.UNAVAILABLE: ServiceUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: ServiceUnavailable,
    # A peer that ends its in-flight calls while shutting down resets them (HTTP/2 CANCEL).
    grpc.StatusCode.CANCELLED: ServiceUnavailable,
}
# Statuses that say the peer could not answer, not that the request was wrong.
PEER_UNAVAILABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)

ERROR_CODE_KEY = "relaygate-error"
RETRY_AFTER_KEY = "relaygate-retry-after"
PARAM_KEY = "relaygate-param"


def to_wire(exc: GatewayError) -> tuple[tuple[str, str], ...]:
    """Trailing metadata that lets :func:`from_wire` rebuild ``exc`` on the other side."""
    metadata = [(ERROR_CODE_KEY, exc.code)]
    if exc.retry_after is not None:
        metadata.append((RETRY_AFTER_KEY, f"{exc.retry_after:.3f}"))
    if exc.param is not None:
        metadata.append((PARAM_KEY, exc.param))
    return tuple(metadata)


def from_wire(status: grpc.StatusCode, message: str, metadata: dict[str, str]) -> GatewayError:
    """The most specific :class:`GatewayError` for a failed RPC."""
    cls = _BY_CODE.get(metadata.get(ERROR_CODE_KEY, ""))
    if cls is None or cls is UpstreamStatus:
        cls = _BY_GRPC_STATUS.get(status, GatewayError)
        if status in PEER_UNAVAILABLE:
            message = f"A gateway component is unavailable ({status.name.lower()}): {message}"
    retry_after = metadata.get(RETRY_AFTER_KEY)
    return cls(
        message,
        param=metadata.get(PARAM_KEY),
        retry_after=float(retry_after) if retry_after else None,
    )
