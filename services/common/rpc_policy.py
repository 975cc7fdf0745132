"""Who may call which internal RPC: one table for every gRPC service relaygate serves.

Each RPC's full name maps to the identities (``services.common.tls``) allowed to call it on their own
and, for admin-level RPCs, the admin-token scope that lets an ``admin`` caller through. An RPC that is
not in the table is refused (deny by default), a server refuses to start while one of its RPCs has no
rule, and ``tests/security`` checks the table against the service descriptors.

The relay's inference port has its own table, :data:`FRONT_RULES`: its callers are applications holding a
relaygate API key, not services holding a certificate of the deployment, so every rule there admits
any caller (``any_caller``) and the handlers authenticate the key in the ``authorization`` metadata
exactly as the HTTP front does (refusing with UNAUTHENTICATED). TLS still proves the relay to them.
Health and reflection on that port answer whoever reaches it, like the relay's HTTP ``/healthz``.

The relay is allowed every admin-level RPC without a token: it fronts the admin API, which has already
checked the caller's admin token and scope before it calls. Channel listings carry provider credentials
in clear, so only relays read them; people see them masked through the admin API.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from services.common.scopes import ADMIN_READ, ADMIN_WRITE
from services.common.tls import IDENTITIES, LOGGER, QUOTA, RELAY

__all__ = ["FRONT_RULES", "INFERENCE_SERVICE", "READ", "RULES", "WRITE", "Rule", "method_name"]

READ = ADMIN_READ
WRITE = ADMIN_WRITE


@dataclass(frozen=True)
class Rule:
    """``callers`` may call on their own; an ``admin`` caller also may when ``admin_scope`` is set and it
    presents an admin token with that scope; with ``any_caller`` no certificate is asked for (the
    handler authenticates its caller itself, see the module docstring)."""

    callers: frozenset[str]
    admin_scope: str = ""
    any_caller: bool = False


def method_name(service: str, method: str) -> str:
    """The full name gRPC routes on: ``/package.Service/Method``."""
    return f"/{service}/{method}"


def _relay() -> Rule:
    return Rule(frozenset({RELAY}))


def _admin(scope: str) -> Rule:
    return Rule(frozenset({RELAY}), admin_scope=scope)


def _service(name: str, rules: Mapping[str, Rule]) -> dict[str, Rule]:
    return {method_name(name, method): rule for method, rule in rules.items()}


RULES: Mapping[str, Rule] = {
    **_service(
        "relaygate.auth.v1.AuthService",
        {
            "VerifyKey": _relay(),
            "CreateUser": _admin(WRITE),
            "ListUsers": _admin(READ),
            "CreateKey": _admin(WRITE),
            "ListKeys": _admin(READ),
            "RevokeKey": _admin(WRITE),
            "UpdateKey": _admin(WRITE),
            "RotateKey": _admin(WRITE),
            # Exchanges an admin API key for a token, checking the key's CIDRs against the client
            # address the relay saw: admins get tokens from the relay's POST /admin/v1/tokens.
            "IssueAdminToken": _relay(),
            # Services that accept admin tokens on their own RPCs ask auth whether one is still good.
            "VerifyAdminToken": Rule(frozenset({RELAY, QUOTA, LOGGER})),
            # Signing out: the token is its own credential (the relay's DELETE /admin/v1/tokens).
            "RevokeAdminToken": _relay(),
        },
    ),
    **_service(
        "relaygate.quota.v1.QuotaService",
        {
            "Reserve": _relay(),
            "Settle": _relay(),
            "Release": _relay(),
            "Sync": _relay(),
            "GetBalance": _admin(READ),
            "TopUp": _admin(WRITE),
            "SetBudget": _admin(WRITE),
            "GetBudgets": _admin(READ),
            "ListReservations": _admin(READ),
            "Reconcile": _admin(READ),
            "SetPrice": _admin(WRITE),
            "ListPrices": _admin(READ),
        },
    ),
    **_service(
        "relaygate.catalog.v1.CatalogService",
        {
            "UpsertChannel": _admin(WRITE),
            "DeleteChannel": _admin(WRITE),
            "ListChannels": _relay(),
        },
    ),
    **_service(
        "relaygate.logger.v1.LoggerService",
        {
            "ListRequestLogs": _admin(READ),
            "GetUsageSummary": _admin(READ),
        },
    ),
    # Every certificate holder may check health and browse the schema (grpcurl, probes with a
    # certificate); the plaintext probe port serves health alone (see services.common.grpc).
    **_service(
        "grpc.health.v1.Health",
        {name: Rule(frozenset(IDENTITIES)) for name in ("Check", "List", "Watch")},
    ),
    **_service(
        "grpc.reflection.v1alpha.ServerReflection",
        {"ServerReflectionInfo": Rule(frozenset(IDENTITIES))},
    ),
}

INFERENCE_SERVICE = "relaygate.relay.v1.InferenceService"
_KEY_HOLDER = Rule(frozenset(), any_caller=True)

_INFERENCE_RPCS = (
    "CreateChatCompletion",
    "StreamChatCompletion",
    "CreateCompletion",
    "CreateEmbedding",
    "ListModels",
)

FRONT_RULES: Mapping[str, Rule] = {
    **_service(INFERENCE_SERVICE, dict.fromkeys(_INFERENCE_RPCS, _KEY_HOLDER)),
    **_service("grpc.health.v1.Health", dict.fromkeys(("Check", "List", "Watch"), _KEY_HOLDER)),
    **_service("grpc.reflection.v1alpha.ServerReflection", {"ServerReflectionInfo": _KEY_HOLDER}),
}
