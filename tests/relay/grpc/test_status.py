"""The inference service's refusals, without a stack: every class of the error tree becomes the
status code and google.rpc details the README promises, read back the way a client reads them
(``grpc-status-details-bin``), and the ``relaygate-error`` metadata still rebuilds the class."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

import services.relay
from services.common.errors import (
    UNAVAILABLE_RETRY_AFTER_S,
    AuthenticationError,
    BudgetExceeded,
    ConcurrencyLimited,
    Conflict,
    CreditRecalled,
    GatewayError,
    InsufficientQuota,
    InvalidRequest,
    ModelNotFound,
    NotFound,
    NoUpstreamAvailable,
    PayloadTooLarge,
    PermissionDenied,
    QuotaError,
    RateLimited,
    ServiceUnavailable,
    UpstreamError,
    UpstreamStatus,
    UpstreamTimeout,
    from_wire,
)
from services.common.pb.relaygate.auth.v1.auth_pb2 import Principal
from services.relay.edge.grpc.status import DOMAIN, Refusal, refusal
from services.relay.upstream.proxy import PoolExhausted, UpstreamRejected

PRINCIPAL = Principal(key_id="key_abc", user_id="usr_xyz")
REQUEST_ID = "req_0123"

# Every class of the tree and the status it must end a call with (written out, not read from the
# classes, so that a changed mapping shows here).
CODES: dict[type[GatewayError], grpc.StatusCode] = {
    GatewayError: grpc.StatusCode.INTERNAL,
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    NotFound: grpc.StatusCode.NOT_FOUND,
    Conflict: grpc.StatusCode.ALREADY_EXISTS,
    PayloadTooLarge: grpc.StatusCode.INVALID_ARGUMENT,
    AuthenticationError: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    QuotaError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    InsufficientQuota: grpc.StatusCode.RESOURCE_EXHAUSTED,
    BudgetExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    RateLimited: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ConcurrencyLimited: grpc.StatusCode.RESOURCE_EXHAUSTED,
    CreditRecalled: grpc.StatusCode.RESOURCE_EXHAUSTED,
    UpstreamError: grpc.StatusCode.UNAVAILABLE,
    UpstreamTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    UpstreamStatus: grpc.StatusCode.UNAVAILABLE,
    NoUpstreamAvailable: grpc.StatusCode.UNAVAILABLE,
    ServiceUnavailable: grpc.StatusCode.UNAVAILABLE,
    # The relay's own: an upstream's refusal of the request itself, and its pools being full.
    UpstreamRejected: grpc.StatusCode.INVALID_ARGUMENT,
    PoolExhausted: grpc.StatusCode.UNAVAILABLE,
}
# Raised by the HTTP front's connection guard before any route, so never on a gRPC call.
HTTP_ONLY = "services.relay.edge.http"

DETAIL_TYPES: tuple[type[Message], ...] = (
    error_details_pb2.ErrorInfo,
    error_details_pb2.RetryInfo,
    error_details_pb2.QuotaFailure,
    error_details_pb2.BadRequest,
)


def subclasses(cls: type[GatewayError]) -> Iterator[type[GatewayError]]:
    yield cls
    for sub in cls.__subclasses__():
        yield from subclasses(sub)


def lineage(cls: type[GatewayError]) -> Iterator[type[GatewayError]]:
    """``cls`` and the classes of the tree it refines, nearest first."""
    for base in cls.__mro__:
        if isinstance(base, type) and issubclass(base, GatewayError):
            yield base


def instance(cls: type[GatewayError]) -> GatewayError:
    if cls is UpstreamStatus:
        return UpstreamStatus(status=500, body=b"")
    if cls is UpstreamRejected:
        return UpstreamRejected(status=400, body=b"")
    return cls()


def every_class_a_call_can_meet() -> set[type[GatewayError]]:
    """The tree as the relay defines it: every relay module imported first (so the answer does not
    depend on which modules the tests before happened to import), the HTTP front's own left out."""
    for module in pkgutil.walk_packages(services.relay.__path__, "services.relay."):
        importlib.import_module(module.name)
    return {cls for cls in subclasses(GatewayError) if not cls.__module__.startswith(HTTP_ONLY)}


def metadata(ended: Refusal) -> dict[str, str | bytes]:
    found: dict[str, str | bytes] = {}
    for key, value in ended.metadata:
        assert key not in found, f"{key} sent twice"
        found[key] = value
    return found


def details(ended: Refusal) -> dict[str, Message]:
    """The google.rpc details of a refusal by type name, checked against its code and message."""
    packed = metadata(ended)["grpc-status-details-bin"]
    assert isinstance(packed, bytes)
    status = status_pb2.Status.FromString(packed)
    assert (status.code, status.message) == (ended.code.value[0], ended.message)
    found: dict[str, Message] = {}
    for any_detail in status.details:
        kind = next(k for k in DETAIL_TYPES if any_detail.Is(k.DESCRIPTOR))
        detail = kind()
        any_detail.Unpack(detail)
        assert kind.DESCRIPTOR.name not in found
        found[kind.DESCRIPTOR.name] = detail
    return found


def retry_seconds(found: dict[str, Message]) -> float:
    retry = found["RetryInfo"]
    assert isinstance(retry, error_details_pb2.RetryInfo)
    return float(retry.retry_delay.ToNanoseconds()) / 1e9


def quota_subjects(found: dict[str, Message]) -> list[str]:
    failure = found["QuotaFailure"]
    assert isinstance(failure, error_details_pb2.QuotaFailure)
    return [v.subject for v in failure.violations]


def test_the_table_names_every_class_of_the_tree() -> None:
    assert every_class_a_call_can_meet() == set(CODES)


@pytest.mark.parametrize("cls", list(CODES), ids=lambda c: c.__name__)
def test_every_error_class_has_its_code_and_details(cls: type[GatewayError]) -> None:
    exc = instance(cls)
    ended = refusal(exc, request_id=REQUEST_ID, principal=PRINCIPAL)
    assert ended.code == CODES[cls]
    assert ended.message == exc.message
    found = details(ended)

    info = found["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain) == (cls.code.upper(), DOMAIN)
    assert dict(info.metadata) == {
        "type": cls.type,
        "http_status": str(exc.status),
        "request_id": REQUEST_ID,
    }
    # RetryInfo where waiting may help: an error that says when, or any unavailability.
    waits = exc.retry_after is not None or ended.code == grpc.StatusCode.UNAVAILABLE
    assert ("RetryInfo" in found) is waits
    assert ("QuotaFailure" in found) is issubclass(cls, QuotaError)
    # No field at fault: no BadRequest.
    assert "BadRequest" not in found

    sent = metadata(ended)
    assert sent["x-request-id"] == REQUEST_ID
    wire = {k: v for k, v in sent.items() if isinstance(v, str)}
    rebuilt = from_wire(ended.code, ended.message, wire)
    if cls is UpstreamStatus:
        # An upstream's status is the caller's refusal only: a relaygate process reading it sees
        # its status code's class (a component unavailable, retry shortly).
        assert (type(rebuilt), rebuilt.retry_after) == (ServiceUnavailable, UNAVAILABLE_RETRY_AFTER_S)
    else:
        # The same code (QuotaError and InsufficientQuota share theirs); a class the relay defines
        # comes back as the shared tree's class it refines (other processes know only that tree).
        shared = next(c for c in lineage(cls) if c.__module__ == GatewayError.__module__)
        assert (rebuilt.code, rebuilt.retry_after) == (shared.code, exc.retry_after)


def test_a_rate_limit_is_resource_exhausted_with_retry_info_and_a_quota_failure_on_the_key() -> None:
    ended = refusal(RateLimited("rpm limit", retry_after=2.5), request_id=REQUEST_ID, principal=PRINCIPAL)
    assert ended.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    found = details(ended)
    assert retry_seconds(found) == 2.5
    assert quota_subjects(found) == ["key:key_abc"]
    info = found["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert (info.reason, info.metadata["type"], info.metadata["http_status"]) == (
        "RATE_LIMIT_EXCEEDED",
        "rate_limit_error",
        "429",
    )


def test_a_concurrency_limit_names_the_key() -> None:
    ended = refusal(ConcurrencyLimited("too many streams", retry_after=1.0), principal=PRINCIPAL)
    found = details(ended)
    assert quota_subjects(found) == ["key:key_abc"]
    assert retry_seconds(found) == 1.0


@pytest.mark.parametrize(
    ("param", "subject"),
    [
        ("budgets.key.day", "key:key_abc"),
        ("budgets.key.month", "key:key_abc"),
        ("budgets.user.day", "user:usr_xyz"),
        ("budgets.user.month", "user:usr_xyz"),
    ],
)
def test_a_budget_refusal_names_the_scope_of_the_budget(param: str, subject: str) -> None:
    exc = BudgetExceeded("budget exceeded", param=param, retry_after=3600.0)
    ended = refusal(exc, principal=PRINCIPAL)
    assert ended.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    found = details(ended)
    assert quota_subjects(found) == [subject]
    assert retry_seconds(found) == 3600.0
    info = found["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.metadata["param"] == param


@pytest.mark.parametrize("cls", [InsufficientQuota, CreditRecalled], ids=lambda c: c.__name__)
def test_balance_refusals_name_the_user(cls: type[QuotaError]) -> None:
    assert quota_subjects(details(refusal(cls(), principal=PRINCIPAL))) == ["user:usr_xyz"]


def test_an_upstream_429_is_resource_exhausted_with_the_upstreams_message() -> None:
    body = b'{"error": {"message": "slow down", "type": "rate_limit_error"}}'
    ended = refusal(UpstreamStatus(status=429, body=body), principal=PRINCIPAL)
    assert ended.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ended.message == "slow down"
    found = details(ended)
    info = found["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert (info.reason, info.metadata["http_status"]) == ("UPSTREAM_STATUS", "429")
    # The provider's limit, not one of ours: no QuotaFailure naming the caller.
    assert "QuotaFailure" not in found


@pytest.mark.parametrize(
    "exc",
    [UpstreamError(), NoUpstreamAvailable(), UpstreamStatus(status=503), ServiceUnavailable()],
    ids=["upstream-error", "no-upstream", "upstream-503", "component"],
)
def test_an_upstream_or_component_down_is_unavailable_with_retry_info(exc: GatewayError) -> None:
    ended = refusal(exc)
    assert ended.code == grpc.StatusCode.UNAVAILABLE
    assert retry_seconds(details(ended)) == UNAVAILABLE_RETRY_AFTER_S


def test_a_retry_after_of_its_own_wins_over_the_standard_delay() -> None:
    assert retry_seconds(details(refusal(ServiceUnavailable(retry_after=7.0)))) == 7.0


def test_an_invalid_field_is_named_in_bad_request_and_error_info() -> None:
    ended = refusal(InvalidRequest("max_tokens must be positive", param="max_tokens"))
    assert ended.code == grpc.StatusCode.INVALID_ARGUMENT
    found = details(ended)
    bad = found["BadRequest"]
    assert isinstance(bad, error_details_pb2.BadRequest)
    assert [(v.field, v.description) for v in bad.field_violations] == [
        ("max_tokens", "max_tokens must be positive")
    ]
    info = found["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.metadata["param"] == "max_tokens"
    assert "request_id" not in info.metadata
    assert "x-request-id" not in metadata(ended)


def test_a_refusal_before_the_key_is_known_names_no_subject() -> None:
    assert quota_subjects(details(refusal(InsufficientQuota()))) == [""]
