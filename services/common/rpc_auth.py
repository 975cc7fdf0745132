"""The server side of internal API security: every RPC is checked against ``rpc_policy.RULES`` before
its handler runs.

The caller's identity is read from its verified certificate (``services.common.tls``). No identity →
UNAUTHENTICATED; an identity the rule does not name → PERMISSION_DENIED; an RPC without a rule →
PERMISSION_DENIED (deny by default). An ``admin`` caller reaches admin-level RPCs with an admin token in
the ``authorization: Bearer …`` metadata, the same tokens the HTTP admin API takes, checked by an
:data:`AdminTokenCheck` (auth checks its own; quota and the logger ask auth, see ``admin_tokens``).

Refusals of the certificate carry no ``relaygate-error`` metadata, so a caller whose own certificate is
refused does not mistake it for its client's fault (see ``services.common.grpc.rpc_error``); a refused
admin token does, so an admin's tool shows why.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from services.common.errors import GatewayError, to_wire
from services.common.interceptors import MethodInterceptor
from services.common.rpc_policy import RULES, Rule
from services.common.tls import ADMIN, Tls, peer_identity

__all__ = ["AdminTokenCheck", "RpcAuthInterceptor", "ServerSecurity", "bearer_token", "peer_address"]

log = logging.getLogger(__name__)

# (token, required scope, caller's address) → None, or raises the GatewayError that refuses it.
AdminTokenCheck = Callable[[str, str, str], Awaitable[None]]

Context = grpc.aio.ServicerContext[Any, Any]


@dataclass(frozen=True)
class ServerSecurity:
    """How a gRPC server authenticates: its certificate (None: plaintext, local development only), who
    checks admin tokens, the permission table, the plaintext probe port (empty: none) and whether the
    TLS handshake demands a client certificate (not on the relay's inference port, whose callers
    present API keys)."""

    tls: Tls | None
    admin_tokens: AdminTokenCheck | None = None
    rules: Mapping[str, Rule] = field(default_factory=lambda: RULES)
    health_listen: str = ""
    client_certificates: bool = True


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def bearer_token(context: Context) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
    return ""


def peer_address(context: Context) -> str:
    """The caller's IP address (``ipv4:10.0.0.1:5000`` → ``10.0.0.1``, ``ipv6:[::1]:5000`` → ``::1``)."""
    peer = context.peer() or ""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6" and rest.startswith("["):
        return rest[1 : rest.find("]")]
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    return ""


class RpcAuthInterceptor(MethodInterceptor):
    """Checks each call against ``rules`` before the handler runs (see the module docstring)."""

    def __init__(self, rules: Mapping[str, Rule], admin_tokens: AdminTokenCheck | None) -> None:
        super().__init__()
        self._rules = rules
        self._admin_tokens = admin_tokens

    def wrap(self, method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        rule = self._rules.get(method)

        async def admit(context: Context) -> None:
            try:
                await self._admit(method, rule, context)
            except _Refused as refused:
                log.warning(
                    "rpc refused",
                    extra={"method": method, "peer": context.peer(), "reason": refused.message},
                )
                await context.abort(refused.code, refused.message, trailing_metadata=())
            except GatewayError as exc:
                log.warning(
                    "rpc refused", extra={"method": method, "peer": context.peer(), "reason": exc.message}
                )
                await context.abort(exc.grpc_status, exc.message, trailing_metadata=to_wire(exc))

        return _guarded(handler, admit)

    async def _admit(self, method: str, rule: Rule | None, context: Context) -> None:
        if rule is None:
            raise _Refused(grpc.StatusCode.PERMISSION_DENIED, f"{method} has no permission rule; refused")
        if rule.any_caller:
            return
        identity = peer_identity(context)
        if identity is None:
            raise _Refused(
                grpc.StatusCode.UNAUTHENTICATED,
                "a client certificate naming a relaygate identity is required",
            )
        if identity in rule.callers:
            return
        if identity != ADMIN or not rule.admin_scope:
            raise _Refused(grpc.StatusCode.PERMISSION_DENIED, f"{identity} may not call {method}")
        token = bearer_token(context)
        if not token:
            raise _Refused(
                grpc.StatusCode.UNAUTHENTICATED,
                f"{method} needs an admin token with the {rule.admin_scope!r} scope "
                "(metadata authorization: Bearer <token>)",
            )
        if self._admin_tokens is None:
            raise _Refused(grpc.StatusCode.PERMISSION_DENIED, "this server does not accept admin tokens")
        await self._admin_tokens(token, rule.admin_scope, peer_address(context))


def _guarded(
    handler: grpc.RpcMethodHandler[Any, Any], admit: Callable[[Context], Awaitable[None]]
) -> grpc.RpcMethodHandler[Any, Any]:
    """``handler`` with ``admit`` run before it, whatever its streaming shape."""
    codec = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(_single(handler.unary_unary, admit), **codec)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(_single(handler.stream_unary, admit), **codec)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(_streaming(handler.unary_stream, admit), **codec)
    assert handler.stream_stream is not None
    return grpc.stream_stream_rpc_method_handler(_streaming(handler.stream_stream, admit), **codec)


def _single(inner: Callable[..., Any], admit: Callable[[Context], Awaitable[None]]) -> Callable[..., Any]:
    async def behavior(request: Any, context: Context) -> Any:
        await admit(context)
        return await inner(request, context)

    return behavior


def _streaming(inner: Callable[..., Any], admit: Callable[[Context], Awaitable[None]]) -> Callable[..., Any]:
    # grpc.aio serves a streaming handler written either as an async generator or as a coroutine that
    # calls context.write(); the guard must keep the inner one's shape.
    if inspect.isasyncgenfunction(inner):

        async def generator(request: Any, context: Context) -> AsyncIterator[Any]:
            await admit(context)
            async for response in inner(request, context):
                yield response

        return generator

    async def writer(request: Any, context: Context) -> None:
        await admit(context)
        await inner(request, context)

    return writer
