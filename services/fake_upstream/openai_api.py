"""The OpenAI dialect: the fake upstream's original paths under ``/v1``, bearer keys, OpenAI errors.

Shapes follow the OpenAI API reference (https://platform.openai.com/docs/api-reference): chat
completions, legacy completions, embeddings, images, models, and the error object
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

from . import endpoints, payloads
from .behaviour import Behaviour
from .dialect import Call, Dialect, ProviderHandler, Route, Streams, bearer_token
from .endpoints import JSON_HEADERS, Handler, JsonReply, Reply, RequestError

_ROUTES: dict[str, tuple[str, Handler, Streams]] = {
    "/v1/chat/completions": ("POST", endpoints.chat_completions, Streams.ON_REQUEST),
    "/v1/completions": ("POST", endpoints.completions, Streams.ON_REQUEST),
    "/v1/embeddings": ("POST", endpoints.embeddings, Streams.NEVER),
    "/v1/images/generations": ("POST", endpoints.image_generations, Streams.NEVER),
    "/v1/models": ("GET", endpoints.list_models, Streams.NEVER),
}


def _body_only(handler: Handler) -> ProviderHandler:
    def handle(call: Call, behaviour: Behaviour) -> Reply:
        return handler(call.body, behaviour)

    return handle


_MATCHED: dict[str, Route] = {
    path: Route(method, _body_only(handler), {}, streams)
    for path, (method, handler, streams) in _ROUTES.items()
}


def _match(path: str) -> Route | None:
    return _MATCHED.get(path)


def _refuse(call: Call, behaviour: Behaviour) -> JsonReply | None:
    if behaviour.api_key is None or bearer_token(call.headers) == behaviour.api_key:
        return None
    return RequestError(401, "Incorrect API key provided.", code="invalid_api_key").reply()


def _error(error: RequestError) -> JsonReply:
    return error.reply()


def injected(status: int, behaviour: Behaviour) -> JsonReply:
    """OpenAI's answer for ``status``; a 429 carries ``retry-after``."""
    headers = JSON_HEADERS
    if status == 429:
        headers = (*JSON_HEADERS, (b"retry-after", str(behaviour.retry_after).encode()))
    return JsonReply(payloads.injected_error(status), status, headers)


DIALECT = Dialect("openai", _match, _refuse, _error, injected)
