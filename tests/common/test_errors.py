from __future__ import annotations

import grpc
import pytest

from services.common import errors
from services.common.errors import from_wire, to_wire


@pytest.mark.parametrize(
    "exc",
    [
        errors.InvalidRequest("bad field", param="messages"),
        errors.ModelNotFound("no such model"),
        errors.NotFound("no such key"),
        errors.AuthenticationError(),
        errors.PermissionDenied("not this model"),
        errors.InsufficientQuota("need 5, have 3"),
        errors.BudgetExceeded("daily budget"),
        errors.RateLimited("slow down", retry_after=1.5),
        errors.ConcurrencyLimited("too many", retry_after=0.2),
        errors.ServiceUnavailable("db down"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_round_trip_over_grpc_metadata(exc: errors.GatewayError) -> None:
    rebuilt = from_wire(exc.grpc_status, exc.message, dict(to_wire(exc)))
    assert type(rebuilt) is type(exc)
    assert rebuilt.message == exc.message
    assert rebuilt.param == exc.param
    assert rebuilt.retry_after == exc.retry_after


def test_unknown_code_falls_back_to_status() -> None:
    rebuilt = from_wire(grpc.StatusCode.NOT_FOUND, "gone", {"relaygate-error": "something_new"})
    assert type(rebuilt) is errors.NotFound


def test_openai_shape() -> None:
    body = errors.InsufficientQuota("need more").to_openai()
    assert body == {
        "error": {
            "message": "need more",
            "type": "insufficient_quota",
            "param": None,
            "code": "insufficient_quota",
        }
    }
    assert errors.InsufficientQuota().status == 429
    assert errors.AuthenticationError().status == 401
    assert errors.UpstreamStatus(status=503).status == 503


def test_faults() -> None:
    assert errors.InvalidRequest().fault == "caller"
    assert errors.RateLimited().fault == "policy"
    assert errors.UpstreamTimeout().fault == "provider"
    assert errors.ServiceUnavailable().fault == "gateway"
