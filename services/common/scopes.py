"""Key scopes, evaluated the same way by auth (on lookup) and by the relay (on a cache hit), and the
admin-token scopes auth issues, which the HTTP admin API and the internal RPC policy check alike."""

from __future__ import annotations

import fnmatch
import ipaddress
from functools import lru_cache

from services.common.pb.relaygate.auth.v1.auth_pb2 import DenyReason, Principal

ADMIN_READ = "admin:read"
ADMIN_WRITE = "admin:write"


@lru_cache(maxsize=4096)
def _network(cidr: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(cidr, strict=False)


def model_allowed(patterns: list[str], model: str) -> bool:
    """Empty means every model; otherwise an exact name or an fnmatch pattern must match."""
    if not patterns:
        return True
    return any(p == model or (any(c in p for c in "*?[") and fnmatch.fnmatchcase(model, p)) for p in patterns)


def ip_allowed(cidrs: list[str], client_ip: str) -> bool:
    """Empty means every address; an unparsable client address is never allowed by a CIDR list."""
    if not cidrs:
        return True
    try:
        address = ipaddress.ip_address(client_ip)
    except ValueError:
        return False
    return any(address in _network(c) for c in cidrs)


def check(
    principal: Principal, *, model: str, client_ip: str, now: float
) -> tuple[DenyReason.ValueType, str]:
    """``(DENY_REASON_UNSPECIFIED, "")`` when the principal may make this request, else the reason."""
    if principal.expires_at and now >= principal.expires_at:
        return DenyReason.DENY_REASON_EXPIRED, "This API key has expired."
    if client_ip and not ip_allowed(list(principal.allowed_cidrs), client_ip):
        return DenyReason.DENY_REASON_IP_NOT_ALLOWED, f"This API key may not be used from {client_ip}."
    if model and not model_allowed(list(principal.allowed_models), model):
        return DenyReason.DENY_REASON_MODEL_NOT_ALLOWED, f"This API key may not use the model {model!r}."
    return DenyReason.DENY_REASON_UNSPECIFIED, ""
