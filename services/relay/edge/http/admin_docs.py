"""The admin API's OpenAPI document, served at ``/admin/v1/openapi.json`` with FastAPI's interactive docs
at ``/admin/v1/docs``.

The admin routes read their bodies themselves (protobuf messages in JSON form) and check the caller's
scope in their handler, so FastAPI alone would document neither. :data:`OPERATIONS` names, for every
route, the scope it requires, the message its body holds and the message it answers with; the request
and response schemas are derived from the protobuf descriptors (field names as in ``protos/``, 64-bit
integers as JSON strings, enums by name), so they cannot drift from the messages. A test holds this table
to the routes (every route listed, every scope the one its handler checks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from services.common.pb.relaygate.auth.v1 import auth_pb2
from services.common.pb.relaygate.catalog.v1 import catalog_pb2
from services.common.pb.relaygate.logger.v1 import logger_pb2
from services.common.pb.relaygate.quota.v1 import quota_pb2
from services.common.scopes import ADMIN_READ, ADMIN_WRITE

OPENAPI_URL = "/admin/v1/openapi.json"
DOCS_URL = "/admin/v1/docs"
# The scope an admin token (or, for /tokens, the admin API key itself) must carry.
API_KEY = "api_key"


@dataclass(frozen=True, slots=True)
class Operation:
    scope: str
    summary: str
    # The message the JSON body holds (None: no body).
    request: Descriptor | None = None
    # The message answered (None: the free-form JSON of ``answer``).
    response: Descriptor | None = None
    status: int = 200
    # Documented when the answer is not a protobuf message.
    answer: dict[str, Any] | None = None


_BUDGETS = (
    " `limits.daily_budget_micros` / `limits.monthly_budget_micros` set the quota budgets (README: Budgets)."
)
_CHANNEL_STATUS = {
    "type": "object",
    "properties": {
        "channels": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    name: {"type": kind}
                    for name, kind in (
                        ("channel_id", "string"),
                        ("name", "string"),
                        ("breaker", "string"),
                        ("retry_in_s", "number"),
                        ("connections", "integer"),
                        ("idle", "integer"),
                        ("in_flight", "integer"),
                        ("waiting", "integer"),
                    )
                },
            },
        }
    },
}
_CHANNEL_TEST = {
    "type": "object",
    "properties": {
        name: {"type": kind}
        for name, kind in (
            ("channel_id", "string"),
            ("ok", "boolean"),
            ("model", "string"),
            ("status", "integer"),
            ("latency_ms", "number"),
            ("error", "string"),
        )
    },
}
_PERFORMANCE = {
    "type": "object",
    "description": "See README, 'Performance view', for every field.",
    "properties": {
        "generated_at_ms": {"type": "integer"},
        "percentiles": {"type": "object"},
        "sources": {"type": "array", "items": {"type": "object"}},
        "windows": {
            "type": "object",
            "properties": {name: {"type": "object"} for name in ("1m", "5m", "1h")},
        },
        "minutes": {"type": "array", "items": {"type": "object"}},
        "now": {"type": "object"},
    },
}

# (method, path) -> what the route takes and answers; paths as FastAPI spells them.
OPERATIONS: dict[tuple[str, str], Operation] = {
    ("post", "/admin/v1/tokens"): Operation(
        API_KEY,
        "Exchange an admin user's API key (the bearer credential) for an admin token",
        auth_pb2.IssueAdminTokenRequest.DESCRIPTOR,
        auth_pb2.AdminToken.DESCRIPTOR,
        201,
    ),
    ("delete", "/admin/v1/tokens"): Operation(
        API_KEY,
        "End the admin token that is the bearer credential (signing out); refused from then on",
        response=auth_pb2.RevokeAdminTokenResponse.DESCRIPTOR,
    ),
    ("post", "/admin/v1/users"): Operation(
        ADMIN_WRITE,
        "Create a user." + _BUDGETS,
        auth_pb2.CreateUserRequest.DESCRIPTOR,
        auth_pb2.User.DESCRIPTOR,
        201,
    ),
    ("get", "/admin/v1/users"): Operation(
        ADMIN_READ,
        "List users (`q`: name, email or id containing it; `after`: the last user id of the previous page)",
        response=auth_pb2.ListUsersResponse.DESCRIPTOR,
    ),
    ("post", "/admin/v1/keys"): Operation(
        ADMIN_WRITE,
        "Create an API key (the plaintext is in the answer, once)." + _BUDGETS,
        auth_pb2.CreateKeyRequest.DESCRIPTOR,
        auth_pb2.CreateKeyResponse.DESCRIPTOR,
        201,
    ),
    ("get", "/admin/v1/keys"): Operation(
        ADMIN_READ,
        "List keys (`q`: name, id or user id containing it, or the shown prefix; `after`: the last key id)",
        response=auth_pb2.ListKeysResponse.DESCRIPTOR,
    ),
    ("post", "/admin/v1/keys/{key_id}/revoke"): Operation(
        ADMIN_WRITE, "Revoke a key", response=auth_pb2.ApiKey.DESCRIPTOR
    ),
    ("patch", "/admin/v1/keys/{key_id}"): Operation(
        ADMIN_WRITE,
        "Change the fields present in the body; absent ones stay." + _BUDGETS,
        auth_pb2.ApiKey.DESCRIPTOR,
        auth_pb2.ApiKey.DESCRIPTOR,
    ),
    ("post", "/admin/v1/keys/{key_id}/rotate"): Operation(
        ADMIN_WRITE, "New secret for the same key", response=auth_pb2.CreateKeyResponse.DESCRIPTOR
    ),
    ("post", "/admin/v1/users/{user_id}/topups"): Operation(
        ADMIN_WRITE,
        "Add (or, negative, remove) credit",
        quota_pb2.TopUpRequest.DESCRIPTOR,
        quota_pb2.Balance.DESCRIPTOR,
        201,
    ),
    ("get", "/admin/v1/users/{user_id}/balance"): Operation(
        ADMIN_READ, "Balance, held and available micro-units", response=quota_pb2.Balance.DESCRIPTOR
    ),
    ("get", "/admin/v1/users/{user_id}/reservations"): Operation(
        ADMIN_READ, "Holds, newest first", response=quota_pb2.ReservationList.DESCRIPTOR
    ),
    ("put", "/admin/v1/budgets/{scope}/{scope_id}/{period}"): Operation(
        ADMIN_WRITE,
        "Set a budget (`limit_micros`, 0 removes it)",
        quota_pb2.SetBudgetRequest.DESCRIPTOR,
        quota_pb2.BudgetStatus.DESCRIPTOR,
    ),
    ("get", "/admin/v1/budgets/{scope}/{scope_id}"): Operation(
        ADMIN_READ, "Budgets with spent and held amounts", response=quota_pb2.BudgetList.DESCRIPTOR
    ),
    ("get", "/admin/v1/reconcile"): Operation(
        ADMIN_READ,
        "Every discrepancy between stored totals and the ledger",
        response=quota_pb2.ReconcileResponse.DESCRIPTOR,
    ),
    ("put", "/admin/v1/prices/{model}"): Operation(
        ADMIN_WRITE,
        "Set a model's price (a new version)",
        quota_pb2.Price.DESCRIPTOR,
        quota_pb2.Price.DESCRIPTOR,
    ),
    ("get", "/admin/v1/prices"): Operation(
        ADMIN_READ,
        "List the current prices; with `model`, every version of that model's price, newest first",
        response=quota_pb2.ListPricesResponse.DESCRIPTOR,
    ),
    ("post", "/admin/v1/channels"): Operation(
        ADMIN_WRITE,
        "Create or update a channel (credentials are write-only: answered masked)",
        catalog_pb2.Channel.DESCRIPTOR,
        catalog_pb2.Channel.DESCRIPTOR,
        201,
    ),
    ("get", "/admin/v1/channels/status"): Operation(
        ADMIN_READ,
        "Pools and breakers of the relay process answering (the performance view has every relay's)",
        answer=_CHANNEL_STATUS,
    ),
    ("post", "/admin/v1/channels/{channel_id}/breaker/reset"): Operation(
        ADMIN_WRITE,
        "Close a channel's breaker on every relay (announced on Redis); `relays`: how many took it",
        answer={
            "type": "object",
            "properties": {"reset": {"type": "boolean"}, "relays": {"type": "integer"}},
        },
    ),
    ("post", "/admin/v1/channels/{channel_id}/test"): Operation(
        ADMIN_WRITE,
        'Send one small chat request straight to the channel (body `{"model": ...}` optional: its '
        "first model by default) and answer its status, latency and the upstream's error; billed to no "
        "one, in no usage or log, sent even while the channel's breaker is open",
        answer=_CHANNEL_TEST,
    ),
    ("get", "/admin/v1/channels"): Operation(
        ADMIN_READ, "List channels (credentials masked)", response=catalog_pb2.ChannelList.DESCRIPTOR
    ),
    ("delete", "/admin/v1/channels/{channel_id}"): Operation(
        ADMIN_WRITE, "Delete a channel", response=catalog_pb2.DeleteChannelResponse.DESCRIPTOR
    ),
    ("get", "/admin/v1/logs"): Operation(
        ADMIN_READ,
        "Request logs, newest first (`error_type`: the fault class, caller, policy, provider or gateway)",
        response=logger_pb2.ListRequestLogsResponse.DESCRIPTOR,
    ),
    ("get", "/admin/v1/usage"): Operation(
        ADMIN_READ,
        "Usage per hour or day from the rollups",
        response=logger_pb2.GetUsageSummaryResponse.DESCRIPTOR,
    ),
    ("get", "/admin/v1/performance"): Operation(
        ADMIN_READ,
        "Live figures over 1 min / 5 min / 1 h and the last hour per minute, merged across relays",
        answer=_PERFORMANCE,
    ),
}

_SCALARS: dict[int, dict[str, Any]] = {
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "format": "byte"},
    FieldDescriptor.TYPE_DOUBLE: {"type": "number"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number"},
    FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_UINT32: {"type": "integer", "format": "int32", "minimum": 0},
    FieldDescriptor.TYPE_FIXED32: {"type": "integer", "format": "int32", "minimum": 0},
}
# Protobuf's JSON mapping writes 64-bit integers as strings (and reads either).
_INT64 = {"type": ["string", "integer"], "format": "int64"}
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Struct": {"type": "object"},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array"},
    "google.protobuf.FieldMask": {"type": "string", "description": "comma-separated field paths"},
}


class _Schemas:
    """Schemas of protobuf messages, each once under ``components.schemas`` by its full name."""

    def __init__(self) -> None:
        self.found: dict[str, dict[str, Any]] = {}

    def ref(self, message: Descriptor) -> dict[str, Any]:
        if message.full_name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[message.full_name])
        if message.full_name not in self.found:
            self.found[message.full_name] = {}  # placeholder first: messages may nest themselves
            self.found[message.full_name] = self._object(message)
        return {"$ref": f"#/components/schemas/{message.full_name}"}

    def _object(self, message: Descriptor) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {field.name: self._field(field) for field in message.fields},
        }

    def _field(self, field: FieldDescriptor) -> dict[str, Any]:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value = field.message_type.fields_by_name["value"]
            return {"type": "object", "additionalProperties": self._single(value)}
        single = self._single(field)
        if field.is_repeated:
            return {"type": "array", "items": single}
        return single

    def _single(self, field: FieldDescriptor) -> dict[str, Any]:
        if field.message_type is not None:
            return self.ref(field.message_type)
        if field.enum_type is not None:
            return {"type": "string", "enum": [value.name for value in field.enum_type.values]}
        return dict(_SCALARS.get(field.type, _INT64))


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def document(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document of ``app`` (paths, parameters) with the admin routes' scopes, bodies and
    answers filled in."""
    spec = get_openapi(
        title="relaygate admin API",
        version="v1",
        description=(
            "Admin tokens come from `POST /admin/v1/tokens` (bearer: an admin user's API key). Bodies and "
            "answers are the protobuf messages of `protos/` in JSON form; money is in micro-units. "
            'Errors are `{"error": {"message", "type", "code", "param"}}`.'
        ),
        routes=app.routes,
    )
    schemas = _Schemas()
    error = {"$ref": "#/components/schemas/Error"}
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            known = OPERATIONS.get((method, path))
            if known is None:
                continue
            operation["summary"] = known.summary
            operation["x-required-scope"] = known.scope
            operation["security"] = (
                [{"apiKey": []}] if known.scope == API_KEY else [{"adminToken": [known.scope]}]
            )
            if known.request is not None:
                operation["requestBody"] = {
                    "required": known.scope != API_KEY,
                    "content": _json(schemas.ref(known.request)),
                }
            answer = schemas.ref(known.response) if known.response is not None else (known.answer or {})
            operation["responses"] = {
                str(known.status): {"description": "OK", "content": _json(answer)},
                "400": {"description": "Invalid request", "content": _json(error)},
                "401": {"description": "No valid admin token", "content": _json(error)},
                "403": {"description": f"The token lacks {known.scope}", "content": _json(error)},
            }
    components = spec.setdefault("components", {})
    components.setdefault("schemas", {}).update(schemas.found)
    components["schemas"]["Error"] = {
        "type": "object",
        "properties": {
            "error": {
                "type": "object",
                "properties": {
                    name: {"type": ["string", "null"]} for name in ("message", "type", "code", "param")
                },
            }
        },
    }
    components["securitySchemes"] = {
        "adminToken": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT (admin token)"},
        "apiKey": {"type": "http", "scheme": "bearer", "description": "an admin user's API key (rg-...)"},
    }
    return spec


def install(app: FastAPI) -> None:
    """Serve :func:`document` as the app's OpenAPI document (built once, on first request)."""
    built: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        if not built:
            built.update(document(app))
        return built

    app.openapi = openapi  # type: ignore[method-assign]
