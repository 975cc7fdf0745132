"""Admin tokens presented to quota and the logger, checked by auth.

Tokens stay HS256, signed with auth's secret, and are checked through auth's ``VerifyAdminToken`` rather
than by a public key in each service (Ed25519): a valid signature is not enough, since revoking,
disabling or rotating the token's key, or taking admin away from its user, ends the token at once, and
only auth reads keys. One RPC per admin call is cheap (admin calls are rare); an accepted token is
remembered for ``cache_s`` (2 s by default) so a script's burst of calls costs one.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from services.common.clock import Clock
from services.common.grpc import call, channel
from services.common.pb.relaygate.auth.v1 import auth_pb2
from services.common.pb.relaygate.auth.v1.auth_pb2_grpc import AuthServiceStub
from services.common.rpc_auth import ServerSecurity
from services.common.tls import AUTH, Tls

if TYPE_CHECKING:
    from services.common.pb.relaygate.auth.v1.auth_pb2_grpc import AuthServiceAsyncStub

__all__ = ["AdminTokens", "checked_by_auth"]

# Bounds the memory a flood of distinct valid tokens could take; old entries go first.
_MAX_ENTRIES = 1024


class AdminTokens:
    """An :data:`~services.common.rpc_auth.AdminTokenCheck` asking auth, with a short memory of
    accepted tokens (refusals are never remembered)."""

    def __init__(
        self, auth: AuthServiceAsyncStub, *, rpc_timeout_s: float, cache_s: float, clock: Clock
    ) -> None:
        self._auth = auth
        self._rpc_timeout_s = rpc_timeout_s
        self._cache_s = cache_s
        self._clock = clock
        self._accepted: OrderedDict[tuple[str, str, str], float] = OrderedDict()

    async def __call__(self, token: str, scope: str, client_ip: str) -> None:
        key = (token, scope, client_ip)
        now = self._clock.time()
        until = self._accepted.get(key)
        if until is not None and until > now:
            return
        self._accepted.pop(key, None)
        request = auth_pb2.VerifyAdminTokenRequest(token=token, required_scope=scope, client_ip=client_ip)
        claims = await call(self._auth.VerifyAdminToken, request, timeout=self._rpc_timeout_s)
        if self._cache_s <= 0:
            return
        self._accepted[key] = min(now + self._cache_s, float(claims.expires_at))
        while len(self._accepted) > _MAX_ENTRIES:
            self._accepted.popitem(last=False)


@contextlib.asynccontextmanager
async def checked_by_auth(
    tls: Tls | None,
    *,
    auth_addr: str,
    rpc_timeout_s: float,
    cache_s: float,
    health_listen: str,
    clock: Clock,
) -> AsyncIterator[ServerSecurity]:
    """The security of a server (quota, the logger) whose admin-level RPCs take admin tokens checked by
    auth at ``auth_addr``; the channel to auth lives as long as the block."""
    if tls is None:
        yield ServerSecurity(None, health_listen=health_listen)
        return
    auth = channel(auth_addr, tls=tls, peer=AUTH)
    try:
        tokens = AdminTokens(AuthServiceStub(auth), rpc_timeout_s=rpc_timeout_s, cache_s=cache_s, clock=clock)
        yield ServerSecurity(tls, admin_tokens=tokens, health_listen=health_listen)
    finally:
        await auth.close(None)
