"""The OpenAI dialect: the fake upstream's original paths under ``/v1``, bearer keys, OpenAI errors.

Shapes follow the OpenAI API reference (https://platform.openai.com/docs/api-reference): chat
completions, legacy completions, embeddings, images, models, and the error object
``{"error": {"message", "type", "param", "code"}}``. Chat refuses a short list of other providers'
fields (``thinking``, ``cache_control``, ``thinking_blocks``, ...) as OpenAI refuses unknown ones.
Asked for ``logprobs`` (and ``top_logprobs``), chat choices carry them in OpenAI's shape, one entry
per word of the content (made-up but deterministic numbers).
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from . import endpoints, payloads
from .behaviour import Behaviour
from .dialect import Call, Dialect, ProviderHandler, Route, Streams, bearer_token
from .endpoints import JSON_HEADERS, Handler, JsonReply, Reply, RequestError, StreamReply

# Fields other providers take that OpenAI's chat API refuses as it refuses any field it does not
# know (400 "Unrecognized request argument supplied"), so a test sees the relay send one; a short
# explicit list, since the fake's other callers send OpenAI's newer fields too.
_FOREIGN_FIELDS = ("thinking", "top_k", "stop_sequences", "relaygate_extensions")
# The same inside a message, a content part or a tool (OpenAI: "Additional properties are not allowed").
_FOREIGN_MEMBERS = ("thinking_blocks", "cache_control")


def _foreign(value: Any) -> str | None:
    """The first foreign member of a message, part or tool, if any."""
    if not isinstance(value, dict):
        return None
    for name in _FOREIGN_MEMBERS:
        if name in value:
            return name
    content = value.get("content")
    for part in content if isinstance(content, list) else ():
        if isinstance(part, dict) and "cache_control" in part:
            return "cache_control"
    return None


# A word with the space after it, as the fake's words are streamed.
_TOKENS = re.compile(r"\S+\s*|\s+")
_DATA = b"data: "
MAX_TOP_LOGPROBS = 20


def _top_logprobs(body: dict[str, Any]) -> int | None:
    """How many alternatives each token's logprobs list, or None when logprobs were not asked for."""
    top = body.get("top_logprobs")
    if body.get("logprobs") is not True:
        if top is not None:
            raise RequestError(400, "top_logprobs requires logprobs to be true.", param="top_logprobs")
        return None
    if top is None:
        return 0
    if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
        raise RequestError(
            400, f"top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}.", param="top_logprobs"
        )
    return top


def _entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def logprobs(text: str, top: int) -> dict[str, Any]:
    """OpenAI's ``choices[].logprobs`` of ``text``: one entry per word, each with its ``top`` most
    likely tokens, the word itself first."""
    content = []
    for token in _TOKENS.findall(text):
        logprob = -round(0.01 * (len(token) % 7 + 1), 4)
        entry = _entry(token, logprob)
        entry["top_logprobs"] = [
            _entry(token if rank == 0 else f"{token.strip()}{rank}", round(logprob - rank, 4))
            for rank in range(top)
        ]
        content.append(entry)
    return {"content": content, "refusal": None}


def _with_logprobs(choice: dict[str, Any], message_key: str, top: int) -> None:
    message = choice.get(message_key)
    text = message.get("content") if isinstance(message, dict) else None
    if isinstance(text, str) and text:
        choice["logprobs"] = logprobs(text, top)


def _chunk_with_logprobs(event: bytes, top: int) -> bytes:
    if not event.startswith(_DATA) or event.startswith(payloads.DONE_EVENT):
        return event
    chunk = orjson.loads(event[len(_DATA) :])
    for choice in chunk.get("choices") or ():
        _with_logprobs(choice, "delta", top)
    return payloads.event(chunk)


def _add_logprobs(reply: Reply, top: int) -> Reply:
    if isinstance(reply, StreamReply):
        reply.events = [_chunk_with_logprobs(event, top) for event in reply.events]
        return reply
    if reply.status != 200:
        return reply
    answer = orjson.loads(reply.body)
    for choice in answer.get("choices") or ():
        _with_logprobs(choice, "message", top)
    return JsonReply(orjson.dumps(answer), reply.status, reply.headers)


def openai_chat(body: Any, behaviour: Behaviour) -> Reply:
    """Chat completions, refusing the foreign fields as OpenAI does."""
    if isinstance(body, dict):
        for name in _FOREIGN_FIELDS:
            if name in body:
                raise RequestError(400, f"Unrecognized request argument supplied: {name}")
        for field in ("messages", "tools"):
            given = body.get(field)
            for index, item in enumerate(given if isinstance(given, list) else ()):
                found = _foreign(item)
                if found is not None:
                    raise RequestError(
                        400,
                        f"Additional properties are not allowed ('{found}' was unexpected)"
                        f" - '{field}.{index}'",
                        param=f"{field}.{index}",
                    )
    top = _top_logprobs(body) if isinstance(body, dict) else None
    reply = endpoints.chat_completions(body, behaviour)
    return reply if top is None else _add_logprobs(reply, top)


_ROUTES: dict[str, tuple[str, Handler, Streams]] = {
    "/v1/chat/completions": ("POST", openai_chat, Streams.ON_REQUEST),
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
