"""The gateway's error tree as gRPC statuses with google.rpc details: the one place the inference
service maps a failure.

The status code is the error class's own (``services.common.errors``), except that an upstream's
429 passed through is RESOURCE_EXHAUSTED. Details (``grpc-status-details-bin``, read by
``grpc_status.rpc_status.from_call`` or any gRPC client's rich-status helper):

* ``ErrorInfo`` always: ``reason`` is the OpenAI error code in upper case (``INSUFFICIENT_QUOTA``),
  ``domain`` is ``relaygate.io``, ``metadata`` holds ``type`` (OpenAI's error type), ``http_status``
  (what the HTTP front answers), ``request_id`` and ``param`` when one field is at fault;
* ``RetryInfo`` when waiting may help: the error's own retry-after (rate, concurrency, recalled
  credit, a restarting component) or, for any other UNAVAILABLE, the standard short delay;
* ``QuotaFailure`` for every quota refusal, naming the user (balance, the user's budgets, recalled
  credit) or the key (rate and concurrency limits, the key's budgets) it applies to;
* ``BadRequest`` with the field at fault for an invalid request that names one.

The ``relaygate-error`` metadata of :func:`services.common.errors.to_wire` goes along too, so a relaygate
process calling this service rebuilds the same exception.
"""

from __future__ import annotations

import grpc
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.common.errors import (
    UNAVAILABLE_RETRY_AFTER_S,
    BudgetExceeded,
    ConcurrencyLimited,
    GatewayError,
    InvalidRequest,
    QuotaError,
    RateLimited,
    UpstreamStatus,
    to_wire,
)
from services.common.pb.relaygate.auth.v1.auth_pb2 import Principal
from services.relay.formats.common import passthrough_message

__all__ = ["DOMAIN", "Metadata", "Refusal", "refusal"]

DOMAIN = "relaygate.io"

Metadata = tuple[tuple[str, str | bytes], ...]

# Quota names the budget a refusal is about as the admin API does: ``budgets.<scope>.<period>``.
_KEY_BUDGET = "budgets.key."


class Refusal:
    """What a call ends with: code, message and trailing metadata (the details among them)."""

    __slots__ = ("code", "message", "metadata")

    def __init__(self, code: grpc.StatusCode, message: str, metadata: Metadata) -> None:
        self.code = code
        self.message = message
        self.metadata = metadata


def _code(exc: GatewayError) -> grpc.StatusCode:
    if isinstance(exc, UpstreamStatus) and exc.status == 429:
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return exc.grpc_status


def _quota_subject(exc: QuotaError, principal: Principal | None) -> str:
    if principal is None:
        return ""
    if isinstance(exc, RateLimited | ConcurrencyLimited):
        return f"key:{principal.key_id}"
    if isinstance(exc, BudgetExceeded) and (exc.param or "").startswith(_KEY_BUDGET):
        return f"key:{principal.key_id}"
    return f"user:{principal.user_id}"


def refusal(exc: GatewayError, *, request_id: str = "", principal: Principal | None = None) -> Refusal:
    """How a call refused with ``exc`` ends (see the module docstring)."""
    code = _code(exc)
    message = passthrough_message(exc)
    metadata = {"type": exc.type, "http_status": str(exc.status)}
    if request_id:
        metadata["request_id"] = request_id
    if exc.param:
        metadata["param"] = exc.param
    details: list[Message] = [
        error_details_pb2.ErrorInfo(reason=exc.code.upper(), domain=DOMAIN, metadata=metadata)
    ]
    retry_after = exc.retry_after
    if retry_after is None and code == grpc.StatusCode.UNAVAILABLE:
        retry_after = UNAVAILABLE_RETRY_AFTER_S
    if retry_after is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromNanoseconds(int(retry_after * 1e9))
        details.append(retry)
    if isinstance(exc, QuotaError):
        violation = error_details_pb2.QuotaFailure.Violation(
            subject=_quota_subject(exc, principal), description=exc.message
        )
        details.append(error_details_pb2.QuotaFailure(violations=[violation]))
    if isinstance(exc, InvalidRequest) and exc.param:
        field = error_details_pb2.BadRequest.FieldViolation(field=exc.param, description=message)
        details.append(error_details_pb2.BadRequest(field_violations=[field]))
    status = status_pb2.Status(code=code.value[0], message=message)
    for detail in details:
        status.details.add().Pack(detail)
    rich = rpc_status.to_status(status)
    trailing: Metadata = (*rich.trailing_metadata, *to_wire(exc))
    if request_id:
        trailing = (*trailing, ("x-request-id", request_id))
    return Refusal(code, message, trailing)
