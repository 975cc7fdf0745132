"""The Azure OpenAI dialect: OpenAI's bodies under ``/openai/deployments/{deployment}/...``.

Shapes follow the Azure OpenAI REST reference
(https://learn.microsoft.com/en-us/azure/ai-services/openai/reference):

* ``POST /openai/deployments/{deployment}/chat/completions``, ``/completions`` and ``/embeddings``,
  each with a required ``api-version`` query parameter; request and reply bodies are OpenAI's,
  and a body without ``model`` is served as the deployment's model (the deployment name);
* the key goes in the ``api-key`` header (Microsoft Entra clients send ``Authorization: Bearer``);
* Azure's own gateway errors are ``{"error": {"code", "message"}}`` with the code as a string: 401
  for a missing or wrong key, 404 ``Resource not found`` for a missing ``api-version``, 400
  ``BadRequest`` for a malformed one, and a 429 with ``retry-after`` and
  ``x-ratelimit-remaining-requests``; errors about the body itself are OpenAI's, passed through.
"""

from __future__ import annotations

import re

import orjson

from . import endpoints
from .behaviour import Behaviour
from .dialect import Call, Dialect, ProviderHandler, Route, Streams, bearer_token
from .endpoints import JSON_HEADERS, Handler, JsonReply, Reply, RequestError

_PATH = re.compile(r"/openai/deployments/([^/]+)/(chat/completions|completions|embeddings)")
_VERSION = re.compile(r"\d{4}-\d{2}-\d{2}(-preview)?")

_OPERATIONS: dict[str, tuple[Handler, Streams]] = {
    "chat/completions": (endpoints.chat_completions, Streams.ON_REQUEST),
    "completions": (endpoints.completions, Streams.ON_REQUEST),
    "embeddings": (endpoints.embeddings, Streams.NEVER),
}

_ACCESS_DENIED = (
    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a "
    "valid key for an active subscription and use a correct regional API endpoint for your resource."
)


def error_body(code: str, message: str) -> bytes:
    return orjson.dumps({"error": {"code": code, "message": message}})


def _refuse(call: Call, behaviour: Behaviour) -> JsonReply | None:
    key = call.headers.get("api-key") or bearer_token(call.headers)
    if not key or (behaviour.api_key is not None and key != behaviour.api_key):
        return JsonReply(error_body("401", _ACCESS_DENIED), 401)
    version = call.query.get("api-version")
    if not version:
        return JsonReply(error_body("404", "Resource not found"), 404)
    if _VERSION.fullmatch(version) is None:
        return JsonReply(error_body("BadRequest", "API version not supported"), 400)
    return None


def _error(error: RequestError) -> JsonReply:
    return error.reply()


def _injected(status: int, behaviour: Behaviour) -> JsonReply:
    if status != 429:
        code = "InternalServerError" if status >= 500 else str(status)
        return JsonReply(error_body(code, "Injected failure."), status)
    message = (
        "Requests to the ChatCompletions_Create Operation have exceeded the token rate limit of your "
        f"current pricing tier. Please retry after {behaviour.retry_after} seconds."
    )
    headers = (
        *JSON_HEADERS,
        (b"retry-after", str(behaviour.retry_after).encode()),
        (b"x-ratelimit-remaining-requests", b"0"),
    )
    return JsonReply(error_body("429", message), 429, headers)


def _deployment_handler(handler: Handler) -> ProviderHandler:
    def handle(call: Call, behaviour: Behaviour) -> Reply:
        body = call.body
        if not body.get("model"):
            body = {**body, "model": call.params["deployment"]}
        return handler(body, behaviour)

    return handle


_HANDLERS = {
    operation: (_deployment_handler(handler), streams)
    for operation, (handler, streams) in _OPERATIONS.items()
}


def _match(path: str) -> Route | None:
    found = _PATH.fullmatch(path)
    if found is None:
        return None
    handler, streams = _HANDLERS[found.group(2)]
    return Route("POST", handler, {"deployment": found.group(1)}, streams)


DIALECT = Dialect("azure-openai", _match, _refuse, _error, _injected)
