"""The admin API (``/admin/v1/...``): thin HTTP over the auth, quota, catalog and logger RPCs.

Callers authenticate with an admin token: a short-lived JWT from ``POST /admin/v1/tokens``, which takes
an admin user's API key. Read routes need the ``admin:read`` scope, the others ``admin:write``. Request
and response bodies are the protobuf messages in their JSON form (field names as in ``protos/``), so the
HTTP and gRPC contracts cannot drift apart.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, TypeVar

import orjson
from fastapi import APIRouter, Depends, Query, Request
from google.protobuf import json_format
from google.protobuf.message import Message
from starlette.responses import Response

from services.common.credentials import mask, mask_headers
from services.common.errors import (
    AuthenticationError,
    GatewayError,
    InvalidRequest,
    NotFound,
    ServiceUnavailable,
)
from services.common.grpc import call
from services.common.pb.relaygate.auth.v1 import auth_pb2
from services.common.pb.relaygate.catalog.v1 import catalog_pb2
from services.common.pb.relaygate.logger.v1 import logger_pb2
from services.common.pb.relaygate.quota.v1 import quota_pb2
from services.common.scopes import ADMIN_READ, ADMIN_WRITE
from services.relay.edge.http.admin_budgets import read_budgets, show_budgets, take_budgets, write_budgets
from services.relay.edge.http.deps import GatewayDep
from services.relay.edge.http.requests import Incoming, read_json
from services.relay.pipeline.channel_probe import CHAT_PATH, probe
from services.relay.pipeline.checks import (
    MAX_ADMIN_TOKEN_CHARS,
    MAX_API_KEY_CHARS,
    bounded_credential,
    refuse_nul,
)
from services.relay.pipeline.gateway import Gateway
from services.relay.pipeline.performance import view as performance_view
from services.relay.upstream.channels import Channel


async def _no_nul_in_url(request: Request) -> None:
    """Path and query values end up in SQL as ids and names, where U+0000 cannot be stored."""
    for name, value in (*request.path_params.items(), *request.query_params.multi_items()):
        refuse_nul([name, value], param=name)


log = logging.getLogger(__name__)

router = APIRouter(prefix="/admin/v1", dependencies=[Depends(_no_nul_in_url)])

M = TypeVar("M", bound=Message)


READ = ADMIN_READ
WRITE = ADMIN_WRITE

# Query integers are bounded by the protobuf field they fill (FastAPI answers 400 outside the range),
# so no value can fail the message's construction.
Int32 = Annotated[int, Query(ge=0, le=2**31 - 1)]
Int64 = Annotated[int, Query(ge=0, le=2**63 - 1)]
HttpStatus = Annotated[int, Query(ge=0, le=999)]
# A list's search text: as long as the longest name it can match.
Search = Annotated[str, Query(max_length=320)]


def _bearer(request: Request) -> str:
    scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError("The admin API needs 'Authorization: Bearer <admin token>'.")
    return bounded_credential(token.strip(), MAX_ADMIN_TOKEN_CHARS)


async def require_admin(request: Request, gateway: Gateway, scope: str) -> str:
    """The admin's user id; 401 without a valid admin token, 403 when it lacks ``scope``."""
    token = _bearer(request)
    if token.startswith("rg-"):
        raise AuthenticationError(
            "The admin API takes an admin token, not an API key: "
            "exchange an admin key for one at POST /admin/v1/tokens."
        )
    claims = await call(
        gateway.auth.VerifyAdminToken,
        auth_pb2.VerifyAdminTokenRequest(
            token=token, required_scope=scope, client_ip=_client_ip(request, gateway)
        ),
        timeout=timeout(gateway),
    )
    return str(claims.user_id)


def _client_ip(request: Request, gateway: Gateway) -> str:
    """The caller's address, decided as for API calls (X-Forwarded-For only when trusted)."""
    incoming = Incoming.from_scope(request.scope)
    return incoming.client_ip(request.scope, trust_forwarded_for=gateway.settings.trust_forwarded_for)


async def read_body(request: Request, gateway: Gateway) -> dict[str, Any]:
    body, _ = await read_json(
        request, max_bytes=gateway.settings.max_body_bytes, max_depth=gateway.settings.max_json_depth
    )
    refuse_nul(body)
    return body


def parse_into(body: dict[str, Any], message: M) -> M:
    try:
        json_format.ParseDict(body, message)
    except json_format.ParseError as exc:
        raise InvalidRequest(str(exc)) from exc
    return message


async def parse(request: Request, gateway: Gateway, message: M, **fixed: Any) -> M:
    body = await read_body(request, gateway)
    body.update(fixed)
    return parse_into(body, message)


def as_dict(message: Any) -> dict[str, Any]:
    """A protobuf message in the admin API's JSON form (typed loosely: the stubs' response types are
    invariant)."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def render(message: Any, status_code: int = 200) -> Response:
    return render_dict(as_dict(message), status_code)


def render_dict(body: dict[str, Any], status_code: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status_code, media_type="application/json")


def timeout(gateway: Gateway) -> float:
    return gateway.settings.rpc_timeout_s


@router.post("/tokens")
async def issue_token(request: Request, gateway: GatewayDep) -> Response:
    """Exchange an admin user's API key (the bearer credential here) for an admin token."""
    api_key = bounded_credential(_bearer(request), MAX_API_KEY_CHARS)
    client_ip = _client_ip(request, gateway)
    message = auth_pb2.IssueAdminTokenRequest(api_key=api_key, client_ip=client_ip)
    if request.headers.get("content-length", "0") != "0":
        message = await parse(request, gateway, message, api_key=api_key, client_ip=client_ip)
    return render(await call(gateway.auth.IssueAdminToken, message, timeout=timeout(gateway)), 201)


@router.delete("/tokens")
async def revoke_token(request: Request, gateway: GatewayDep) -> Response:
    """End the admin token that is the bearer credential (signing out): refused from then on."""
    token = _bearer(request)
    message = auth_pb2.RevokeAdminTokenRequest(token=token)
    return render(await call(gateway.auth.RevokeAdminToken, message, timeout=timeout(gateway)))


@router.post("/users")
async def create_user(request: Request, gateway: GatewayDep) -> Response:
    """``limits.daily_budget_micros`` / ``monthly_budget_micros`` become the user's quota budgets
    (``services.relay.edge.http.admin_budgets``)."""
    actor = await require_admin(request, gateway, WRITE)
    body = await read_body(request, gateway)
    budgets = take_budgets(body)
    message = parse_into(body, auth_pb2.CreateUserRequest())
    user = await call(gateway.auth.CreateUser, message, timeout=timeout(gateway))
    shown = as_dict(user)
    if budgets:
        try:
            await write_budgets(gateway, "user", user.user_id, budgets, actor)
        except GatewayError as exc:
            # Users cannot be removed; a new one has no key and no balance, so nothing spends meanwhile.
            raise ServiceUnavailable(
                f"User {user.user_id} was created without its budgets ({exc.message}); set them with "
                f"PUT /admin/v1/budgets/user/{user.user_id}/{{day|month}}.",
                retry_after=exc.retry_after,
            ) from exc
        show_budgets(shown, budgets)
    return render_dict(shown, 201)


@router.get("/users")
async def list_users(
    request: Request, gateway: GatewayDep, limit: Int32 = 100, after: str = "", q: Search = ""
) -> Response:
    """``q``: only users whose name, email or id contains it (case-insensitive)."""
    await require_admin(request, gateway, READ)
    message = auth_pb2.ListUsersRequest(limit=limit, after_user_id=after, query=q)
    return render(await call(gateway.auth.ListUsers, message, timeout=timeout(gateway)))


@router.post("/keys")
async def create_key(request: Request, gateway: GatewayDep) -> Response:
    """``limits.daily_budget_micros`` / ``monthly_budget_micros`` become the key's quota budgets
    (``services.relay.edge.http.admin_budgets``)."""
    actor = await require_admin(request, gateway, WRITE)
    body = await read_body(request, gateway)
    budgets = take_budgets(body)
    message = parse_into(body, auth_pb2.CreateKeyRequest())
    created = await call(gateway.auth.CreateKey, message, timeout=timeout(gateway))
    shown = as_dict(created)
    if budgets:
        key_id = created.key.key_id
        try:
            await write_budgets(gateway, "key", key_id, budgets, actor)
        except GatewayError as exc:
            # A key without the cap it was created with must not be usable.
            await _revoke_quietly(gateway, key_id)
            raise ServiceUnavailable(
                f"The key could not be given its budgets ({exc.message}); it was revoked: create it again.",
                retry_after=exc.retry_after,
            ) from exc
        show_budgets(shown["key"], budgets)
    return render_dict(shown, 201)


async def _revoke_quietly(gateway: Gateway, key_id: str) -> None:
    try:
        await call(gateway.auth.RevokeKey, auth_pb2.RevokeKeyRequest(key_id=key_id), timeout=timeout(gateway))
    except GatewayError:
        log.error("a key created without its budgets could not be revoked", extra={"key_id": key_id})
    gateway.authenticator.invalidate_key(key_id)


@router.get("/keys")
async def list_keys(
    request: Request,
    gateway: GatewayDep,
    user_id: str = "",
    limit: Int32 = 100,
    after: str = "",
    q: Search = "",
) -> Response:
    """``q``: only keys whose name, id or user id contains it, or whose shown prefix starts with it."""
    await require_admin(request, gateway, READ)
    message = auth_pb2.ListKeysRequest(user_id=user_id, limit=limit, after_key_id=after, query=q)
    return render(await call(gateway.auth.ListKeys, message, timeout=timeout(gateway)))


@router.post("/keys/{key_id}/revoke")
async def revoke_key(key_id: str, request: Request, gateway: GatewayDep) -> Response:
    await require_admin(request, gateway, WRITE)
    revoked = await call(
        gateway.auth.RevokeKey, auth_pb2.RevokeKeyRequest(key_id=key_id), timeout=timeout(gateway)
    )
    gateway.authenticator.invalidate_key(key_id)
    return render(revoked)


@router.patch("/keys/{key_id}")
async def update_key(key_id: str, request: Request, gateway: GatewayDep) -> Response:
    """Change the fields present in the body (name, allowed_models, allowed_cidrs, expires_at, enabled,
    limits, metadata); absent fields stay as they are. ``limits`` replaces the key's rate and
    concurrency limits; its budget fields set the key's quota budgets only when present (0 removes)."""
    actor = await require_admin(request, gateway, WRITE)
    body = await read_body(request, gateway)
    budgets = take_budgets(body)
    message = auth_pb2.UpdateKeyRequest(key_id=key_id, key=parse_into(body, auth_pb2.ApiKey()))
    message.update_mask.paths.extend(sorted(body))
    # Auth first: it knows whether the key exists, and quota keeps no budget of an unknown key.
    updated = await call(gateway.auth.UpdateKey, message, timeout=timeout(gateway))
    gateway.authenticator.invalidate_key(key_id)
    shown = as_dict(updated)
    if budgets:
        await write_budgets(gateway, "key", key_id, budgets, actor)
        show_budgets(shown, await read_budgets(gateway, "key", key_id))
    return render_dict(shown)


@router.post("/keys/{key_id}/rotate")
async def rotate_key(key_id: str, request: Request, gateway: GatewayDep) -> Response:
    await require_admin(request, gateway, WRITE)
    message = auth_pb2.RotateKeyRequest(key_id=key_id)
    rotated = await call(gateway.auth.RotateKey, message, timeout=timeout(gateway))
    gateway.authenticator.invalidate_key(key_id)
    return render(rotated)


@router.post("/users/{user_id}/topups")
async def top_up(user_id: str, request: Request, gateway: GatewayDep) -> Response:
    actor = await require_admin(request, gateway, WRITE)
    message = await parse(request, gateway, quota_pb2.TopUpRequest(), user_id=user_id, actor=actor)
    return render(await call(gateway.quota.TopUp, message, timeout=timeout(gateway)), 201)


@router.get("/users/{user_id}/balance")
async def balance(
    user_id: str, request: Request, gateway: GatewayDep, consistent: bool = False, min_lsn: Int64 = 0
) -> Response:
    """``min_lsn``: the ``written_lsn`` of a top-up this caller made, to read it back from a replica."""
    await require_admin(request, gateway, READ)
    message = quota_pb2.GetBalanceRequest(user_id=user_id, consistent=consistent, min_lsn=min_lsn)
    return render(await call(gateway.quota.GetBalance, message, timeout=timeout(gateway)))


@router.get("/users/{user_id}/reservations")
async def reservations(
    user_id: str,
    request: Request,
    gateway: GatewayDep,
    state: str = "",
    limit: Int32 = 50,
    cursor: str = "",
    consistent: bool = False,
) -> Response:
    await require_admin(request, gateway, READ)
    message = quota_pb2.ListReservationsRequest(
        user_id=user_id, state=state, limit=limit, cursor=cursor, consistent=consistent
    )
    return render(await call(gateway.quota.ListReservations, message, timeout=timeout(gateway)))


@router.put("/budgets/{scope}/{scope_id}/{period}")
async def set_budget(
    scope: str, scope_id: str, period: str, request: Request, gateway: GatewayDep
) -> Response:
    """Body ``{"limit_micros": N}`` (0 removes it); ``scope``: key or user, ``period``: day or month."""
    actor = await require_admin(request, gateway, WRITE)
    message = await parse(
        request,
        gateway,
        quota_pb2.SetBudgetRequest(),
        scope=scope,
        scope_id=scope_id,
        period=period,
        actor=actor,
    )
    return render(await call(gateway.quota.SetBudget, message, timeout=timeout(gateway)))


@router.get("/budgets/{scope}/{scope_id}")
async def budgets(
    scope: str, scope_id: str, request: Request, gateway: GatewayDep, consistent: bool = False
) -> Response:
    await require_admin(request, gateway, READ)
    message = quota_pb2.GetBudgetsRequest(scope=scope, scope_id=scope_id, consistent=consistent)
    return render(await call(gateway.quota.GetBudgets, message, timeout=timeout(gateway)))


@router.get("/reconcile")
async def reconcile(request: Request, gateway: GatewayDep, consistent: bool = False) -> Response:
    """Every discrepancy between stored totals and the ledger; an empty list when the books agree."""
    await require_admin(request, gateway, READ)
    message = quota_pb2.ReconcileRequest(consistent=consistent)
    # Reconciliation scans the ledger: give it more than a request-path deadline.
    return render(await call(gateway.quota.Reconcile, message, timeout=max(30.0, timeout(gateway))))


@router.put("/prices/{model:path}")
async def set_price(model: str, request: Request, gateway: GatewayDep) -> Response:
    await require_admin(request, gateway, WRITE)
    message = await parse(request, gateway, quota_pb2.Price(), model=model)
    return render(await call(gateway.quota.SetPrice, message, timeout=timeout(gateway)))


@router.get("/prices")
async def list_prices(request: Request, gateway: GatewayDep, model: str = "") -> Response:
    """The current price of every model; with ``model``, every version of its price, newest first."""
    await require_admin(request, gateway, READ)
    message = quota_pb2.ListPricesRequest(model=model)
    return render(await call(gateway.quota.ListPrices, message, timeout=timeout(gateway)))


@router.post("/channels")
async def upsert_channel(request: Request, gateway: GatewayDep) -> Response:
    await require_admin(request, gateway, WRITE)
    message = await parse(request, gateway, catalog_pb2.Channel())
    stored = await call(gateway.catalog.UpsertChannel, message, timeout=timeout(gateway))
    await gateway.channels.refresh(consistent=True)
    return render(_masked(stored), 201)


def _masked(channel: catalog_pb2.Channel) -> catalog_pb2.Channel:
    """A channel as the admin API shows it: credentials masked (write-only), the rest as stored.

    Sending it back unchanged keeps the stored credentials (the catalog recognises the masks)."""
    shown = catalog_pb2.Channel()
    shown.CopyFrom(channel)
    shown.api_key = mask(channel.api_key)
    shown.headers.clear()
    shown.headers.update(mask_headers(channel.headers))
    return shown


@router.get("/channels/status")
async def channel_status(request: Request, gateway: GatewayDep) -> Response:
    """Pools and breakers of the relay process answering this call (each relay keeps its own)."""
    await require_admin(request, gateway, READ)
    status = gateway.upstreams.status(gateway.channels.table.channels)
    return Response(orjson.dumps({"channels": status}), media_type="application/json")


@router.get("/performance")
async def performance(request: Request, gateway: GatewayDep) -> Response:
    """Live figures over the last 1 min, 5 min and 1 h, merged across every relay (and the logger,
    quota and auth processes) that posted a snapshot in the last seconds; README "Performance view"."""
    await require_admin(request, gateway, READ)
    if gateway.performance is None:
        raise ServiceUnavailable("This relay keeps no performance windows.")
    return render_dict(performance_view(await gateway.performance.read()))


@router.post("/channels/{channel_id}/breaker/reset")
async def reset_breaker(channel_id: str, request: Request, gateway: GatewayDep) -> Response:
    """Close the channel's breaker on every relay (published on Redis); ``relays``: how many took it."""
    await require_admin(request, gateway, WRITE)
    if not any(c.id == channel_id for c in gateway.channels.table.channels):
        raise NotFound(f"No enabled channel {channel_id!r}.", param="channel_id")
    if gateway.breaker_resets is None:
        raise ServiceUnavailable("This relay was built without its breaker resets.")
    relays = await gateway.breaker_resets.everywhere(channel_id)
    return render_dict({"reset": True, "relays": relays})


@router.post("/channels/{channel_id}/test")
async def test_channel(channel_id: str, request: Request, gateway: GatewayDep) -> Response:
    """One small chat request straight to the channel (``{"model": ...}``, default its first model):
    status, latency and the upstream's error. Billed to no one, in no usage or log, past its breaker."""
    await require_admin(request, gateway, WRITE)
    body = await read_body(request, gateway) if request.headers.get("content-length", "0") != "0" else {}
    listing = await call(
        gateway.catalog.ListChannels,
        catalog_pb2.ListChannelsRequest(consistent=True),
        timeout=timeout(gateway),
    )
    found = next((c for c in listing.channels if c.channel_id == channel_id), None)
    if found is None:
        raise NotFound(f"No channel {channel_id!r}.", param="channel_id")
    try:
        channel = Channel.from_message(found)
    except ValueError as exc:
        raise InvalidRequest(f"Channel {channel_id!r} cannot be used: {exc}", param="channel_id") from exc
    model = body.get("model") or (channel.models[0] if channel.models else "")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("The channel serves no model: name one as 'model'.", param="model")
    if not channel.serves(CHAT_PATH):
        raise InvalidRequest(f"Channel {channel.name!r} serves no chat completions.", param="channel_id")
    result = await probe(channel, model)
    return render_dict({"channel_id": channel_id, **result.as_dict()})


@router.get("/channels")
async def list_channels(request: Request, gateway: GatewayDep) -> Response:
    await require_admin(request, gateway, READ)
    listing = await call(
        gateway.catalog.ListChannels, catalog_pb2.ListChannelsRequest(), timeout=timeout(gateway)
    )
    shown = catalog_pb2.ChannelList(revision=listing.revision, unchanged=listing.unchanged)
    shown.channels.extend(_masked(channel) for channel in listing.channels)
    return render(shown)


@router.delete("/channels/{channel_id}")
async def delete_channel(channel_id: str, request: Request, gateway: GatewayDep) -> Response:
    await require_admin(request, gateway, WRITE)
    message = catalog_pb2.DeleteChannelRequest(channel_id=channel_id)
    deleted = await call(gateway.catalog.DeleteChannel, message, timeout=timeout(gateway))
    await gateway.channels.refresh(consistent=True)
    return render(deleted)


@router.get("/logs")
async def request_logs(
    request: Request,
    gateway: GatewayDep,
    key_id: str = "",
    user_id: str = "",
    model: str = "",
    status_code: HttpStatus = 0,
    since_ms: Int64 = 0,
    until_ms: Int64 = 0,
    limit: Int32 = 50,
    cursor: str = "",
    error_type: str = "",
) -> Response:
    """``error_type``: the fault class of the failures to list (caller, policy, provider, gateway)."""
    await require_admin(request, gateway, READ)
    message = logger_pb2.ListRequestLogsRequest(
        key_id=key_id,
        user_id=user_id,
        model=model,
        status_code=status_code,
        error_type=error_type,
        since_ms=since_ms,
        until_ms=until_ms,
        limit=limit,
        cursor=cursor,
    )
    return render(await call(gateway.logger.ListRequestLogs, message, timeout=timeout(gateway)))


_GROUP_BY = {
    "key": logger_pb2.USAGE_GROUP_BY_KEY,
    "user": logger_pb2.USAGE_GROUP_BY_USER,
    "model": logger_pb2.USAGE_GROUP_BY_MODEL,
}
_GRANULARITY = {"hour": logger_pb2.USAGE_GRANULARITY_HOUR, "day": logger_pb2.USAGE_GRANULARITY_DAY}


@router.get("/usage")
async def usage_summary(
    request: Request,
    gateway: GatewayDep,
    group_by: str = "",
    granularity: str = "hour",
    key_id: str = "",
    user_id: str = "",
    model: str = "",
    since_ms: Int64 = 0,
    until_ms: Int64 = 0,
    limit: Int32 = 0,
    cursor: str = "",
) -> Response:
    """Usage per hour or day from the rollups, grouped by any of key, user, model (comma-separated)."""
    await require_admin(request, gateway, READ)
    dimensions = [part.strip() for part in group_by.split(",") if part.strip()]
    unknown = [d for d in dimensions if d not in _GROUP_BY]
    if unknown:
        raise InvalidRequest(f"group_by takes key, user, model (got {unknown}).", param="group_by")
    if granularity not in _GRANULARITY:
        raise InvalidRequest("granularity is 'hour' or 'day'.", param="granularity")
    message = logger_pb2.GetUsageSummaryRequest(
        group_by=[_GROUP_BY[d] for d in dimensions],
        granularity=_GRANULARITY[granularity],
        key_id=key_id,
        user_id=user_id,
        model=model,
        since_ms=since_ms,
        until_ms=until_ms,
        limit=limit,
        cursor=cursor,
    )
    return render(await call(gateway.logger.GetUsageSummary, message, timeout=timeout(gateway)))
