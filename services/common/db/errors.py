"""Which database failures mean "the database cannot answer now", mapped once for every service.

A primary that is stopping, restarting or unreachable, a replica that went away mid-query, a pool
with no free connection, a statement cancelled by the server, or a write that landed on a read-only
server all say nothing about the request: the caller gets :class:`ServiceUnavailable` (503 with
``Retry-After`` over HTTP, ``UNAVAILABLE`` over gRPC) and may retry. The gRPC servers apply this in
their one error interceptor (:mod:`services.common.grpc`), so no pricing, catalog, budget, key or log
query answers 500 for an outage. Anything else (a broken constraint, a bad statement) is a bug or a
conflict and is left to its own handler.
"""

from __future__ import annotations

from sqlalchemy import exc as sa_exc

from services.common.errors import ServiceUnavailable

__all__ = ["unavailable"]

# SQLSTATE classes and codes of a server that cannot serve now: connection exceptions (08), a
# transaction rolled back by a deadlock or serialization failure (40, succeeds when retried),
# insufficient resources (53), operator intervention such as admin shutdown or a cancelled statement
# (57), system errors (58); and a write reaching a read-only server (25006, a failover in progress).
# Driver errors carry it (asyncpg's connection errors are class 08), wrapped by SQLAlchemy or not.
_UNAVAILABLE_SQLSTATE_CLASSES = frozenset({"08", "40", "53", "57", "58"})
_UNAVAILABLE_SQLSTATES = frozenset({"25006"})

_UNREACHABLE: tuple[type[BaseException], ...] = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.TimeoutError,  # no pooled connection became free
    OSError,  # refused or reset connections
    TimeoutError,
)


def _sqlstate(exc: BaseException) -> str:
    for candidate in (getattr(exc, "orig", None), exc.__cause__, exc):
        state = getattr(candidate, "sqlstate", None)
        if isinstance(state, str):
            return state
    return ""


def unavailable(exc: BaseException) -> ServiceUnavailable | None:
    """The 503 for ``exc`` when it says the database cannot be used now; None for any other error."""
    if isinstance(exc, sa_exc.IntegrityError):
        return None
    state = _sqlstate(exc)
    if (
        isinstance(exc, _UNREACHABLE)
        or (isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated)
        or state[:2] in _UNAVAILABLE_SQLSTATE_CLASSES
        or state in _UNAVAILABLE_SQLSTATES
    ):
        return ServiceUnavailable(f"The database is unavailable ({type(exc).__name__}); retry shortly.")
    return None
