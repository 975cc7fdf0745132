"""The base of relaygate's gRPC server interceptors: each method's handler is wrapped once.

gRPC asks the interceptors for a handler on every call; building the wrapped handler each time would
put closures and metric lookups on every request, so it is built on a method's first call and kept.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

__all__ = ["MethodInterceptor"]

if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # generic only in the type stubs
    _ServerInterceptor = grpc.aio.ServerInterceptor


class MethodInterceptor(_ServerInterceptor, ABC):
    """Wraps each existing method's handler with :meth:`wrap`, once per method name."""

    def __init__(self) -> None:
        self._wrapped: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        method: str = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None:
            return cached
        handler: grpc.RpcMethodHandler[Any, Any] | None = await continuation(handler_call_details)
        if handler is None:
            # No such method here: gRPC answers UNIMPLEMENTED.
            return None  # type: ignore[return-value]
        wrapped = self.wrap(method, handler)
        self._wrapped[method] = wrapped
        return wrapped

    @abstractmethod
    def wrap(self, method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        """The handler to serve ``method`` with (``handler`` itself when there is nothing to add)."""
