"""The relay's HTTP front door: a pure ASGI dispatcher in front of the FastAPI app.

The OpenAI endpoints, health, readiness and metrics are served here straight from the ASGI scope;
every other path (the admin API, unknown URLs) goes to FastAPI. Measured on this machine, a FastAPI
route with a dependency costs ~100 µs of CPU per request (~210 µs when the dependency is a plain
``def``, which FastAPI runs in a thread), a Starlette route ~60 µs, this dispatch ~25 µs: on the
relay's hot path that difference is a large share of the whole gateway overhead. This is the pure
ASGI middleware Starlette itself recommends for hot paths.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI

from services.common import tracing
from services.common.errors import GatewayError
from services.console import PREFIX as CONSOLE_PREFIX
from services.console import Console
from services.relay.edge.http import messages, responses, routes
from services.relay.edge.http.deps import gateway_of
from services.relay.edge.http.openai_errors import MethodNotAllowed
from services.relay.edge.http.routes import Call, respond_error

log = logging.getLogger(__name__)

Handler = Callable[[Call], Awaitable[None]]

_ROUTES: dict[tuple[str, str], Handler] = {
    ("POST", "/v1/chat/completions"): routes.chat_completions,
    ("POST", "/v1/completions"): routes.completions,
    ("POST", "/v1/embeddings"): routes.embeddings,
    ("POST", "/v1/images/generations"): routes.image_generations,
    ("POST", "/v1/messages"): messages.messages,
    ("POST", "/v1/messages/count_tokens"): messages.count_tokens,
    ("POST", "/v1/responses"): responses.responses,
    ("GET", "/v1/models"): routes.models,
    ("GET", "/healthz"): routes.healthz,
    ("GET", "/readyz"): routes.readyz,
    ("GET", "/metrics"): routes.metrics,
}
_MODEL_PREFIX = "/v1/models/"
# Path -> the methods it answers, for a 405 with ``allow`` on any other.
_METHODS = {path: ", ".join(m for m, p in _ROUTES if p == path) for _, path in _ROUTES}


@dataclass(frozen=True, slots=True)
class ServedRoute:
    method: str
    # A path template: ``{name}`` stands for one path parameter.
    path: str
    # The names of the query parameters it reads.
    query: tuple[str, ...] = ()


class Front:
    """Dispatches the relay's own routes; ``app`` serves the rest and runs the lifespan."""

    def __init__(self, app: FastAPI) -> None:
        self._app = app
        self._console = Console(app)

    def routes(self) -> list[ServedRoute]:
        """Every route served, the front's own and the app's (from its OpenAPI description, which
        FastAPI builds from the routes themselves): what tests enumerate so that none is missed."""
        served = [ServedRoute(method, path) for method, path in _ROUTES]
        served.append(ServedRoute("GET", _MODEL_PREFIX + "{model}"))
        for path, operations in self._app.openapi()["paths"].items():
            for method, operation in operations.items():
                query = tuple(p["name"] for p in operation.get("parameters", ()) if p["in"] == "query")
                served.append(ServedRoute(method.upper(), path, query))
        return served

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
        send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
    ) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            handler = _ROUTES.get((scope["method"], path))
            allowed = _METHODS.get(path)
            if handler is None and path.startswith(_MODEL_PREFIX):
                if scope["method"] == "GET":
                    handler = routes.model
                else:
                    allowed = "GET"
            if handler is not None:
                await self._serve(handler, scope, receive, send)
                return
            if allowed is not None:
                await respond_error(
                    send,
                    MethodNotAllowed(f"Method {scope['method']} is not allowed for {path}; use {allowed}."),
                    allow=allowed,
                )
                return
            # Only paths that missed the table above get here: the API routes pay nothing for it.
            if path.startswith(CONSOLE_PREFIX):
                await self._console(scope, receive, send)
                return
        await self._app(scope, receive, send)

    @staticmethod
    async def _serve(
        handler: Handler,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
        send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
    ) -> None:
        with tracing.http_request(scope) as request_span:
            call = Call(gateway_of(scope), scope, receive, tracing.status_into(request_span, send))
            try:
                await handler(call)
            except Exception:
                log.exception("unhandled error in %s %s", scope["method"], scope["path"])
                if not call.started:
                    await respond_error(send, GatewayError())
