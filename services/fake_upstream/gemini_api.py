"""The Gemini dialect: ``POST /v1beta/models/{model}:generateContent`` and ``:streamGenerateContent``.

Shapes follow the Gemini API reference (https://ai.google.dev/api/generate-content):

* request ``contents`` (``role`` + ``parts``), ``systemInstruction``, ``generationConfig``
  (``maxOutputTokens``), ``tools`` (``functionDeclarations`` with ``parameters`` or
  ``parametersJsonSchema``) and ``toolConfig.functionCallingConfig`` (``mode`` ``AUTO`` / ``ANY`` /
  ``NONE``, ``allowedFunctionNames``);
* reply ``candidates`` (``content.parts`` with ``text`` and ``functionCall`` parts, ``role:
  "model"``, ``finishReason`` ``STOP`` / ``MAX_TOKENS``, ``index``), ``usageMetadata``
  (``promptTokenCount``, which includes ``cachedContentTokenCount``; ``candidatesTokenCount``;
  ``thoughtsTokenCount``, outside the candidates' count; ``totalTokenCount``, the sum of prompt,
  candidates and thoughts), ``modelVersion``, ``responseId``;
* streaming: ``?alt=sse`` sends each ``GenerateContentResponse`` as an SSE ``data:`` event, the
  default sends them as the elements of one JSON array; every chunk carries the usage so far and
  the last one the ``finishReason``;
* API keys (https://ai.google.dev/gemini-api/docs/api-key): the ``key`` query parameter or the
  ``x-goog-api-key`` header;
* errors (https://ai.google.dev/gemini-api/docs/troubleshooting): Google's
  ``{"error": {"code", "message", "status"}}`` with the canonical status name, a 429 being
  ``RESOURCE_EXHAUSTED`` with a ``google.rpc.RetryInfo`` detail.

Both ``/v1beta`` and ``/v1`` serve the same methods.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from . import tokens
from .behaviour import Behaviour
from .dialect import Call, Dialect, Route, Streams
from .endpoints import JsonReply, Reply, RequestError, StreamReply, identity_of
from .generation import Plan, plan

_PATH = re.compile(r"/(v1beta|v1)/models/([^/:]+):(generateContent|streamGenerateContent)")

_STATUS_NAMES: dict[int, str] = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "INVALID_ARGUMENT",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "NOT_IMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}

_INJECTED_MESSAGES: dict[int, str] = {
    429: "Resource has been exhausted (e.g. check quota). (injected)",
    500: "An internal error has occurred. (injected)",
    503: "The model is overloaded. Please try again later. (injected)",
}

_JSON_ARRAY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-type", b"application/json; charset=UTF-8"),
)


def error_body(status: int, message: str, details: list[dict[str, Any]] | None = None) -> bytes:
    name = _STATUS_NAMES.get(status, "INTERNAL" if status >= 500 else "FAILED_PRECONDITION")
    error: dict[str, Any] = {"code": status, "message": message, "status": name}
    if details:
        error["details"] = details
    return orjson.dumps({"error": error})


def _error(error: RequestError) -> JsonReply:
    return JsonReply(error_body(error.status, error.message), error.status)


def _injected(status: int, behaviour: Behaviour) -> JsonReply:
    details = None
    if status == 429:
        details = [
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{behaviour.retry_after}s"}
        ]
    message = _INJECTED_MESSAGES.get(status, "Injected failure.")
    return JsonReply(error_body(status, message, details), status)


def _refuse(call: Call, behaviour: Behaviour) -> JsonReply | None:
    key = call.query.get("key") or call.headers.get("x-goog-api-key")
    if not key:
        return _error(
            RequestError(
                403,
                "Method doesn't allow unregistered callers (callers without established identity). "
                "Please use API Key or other form of API consumer identity to call this API.",
            )
        )
    if behaviour.api_key is not None and key != behaviour.api_key:
        # Google answers a wrong key with 400, not 401.
        return _error(RequestError(400, "API key not valid. Please pass a valid API key."))
    return None


def _invalid(message: str) -> RequestError:
    return RequestError(400, message)


def _tools(body: dict[str, Any]) -> tuple[list[tuple[str, Any]], str | None, bool]:
    tools: list[tuple[str, Any]] = []
    raw = body.get("tools") or []
    if not isinstance(raw, list):
        raise _invalid("Invalid value at 'tools': expected a list")
    for tool in raw:
        declarations = tool.get("functionDeclarations") if isinstance(tool, dict) else None
        for declaration in declarations or []:
            if not isinstance(declaration, dict) or not isinstance(declaration.get("name"), str):
                raise _invalid(
                    "* GenerateContentRequest.tools[0].function_declarations[0].name: Name is required"
                )
            schema = declaration.get("parametersJsonSchema", declaration.get("parameters"))
            tools.append((declaration["name"], schema))
    config = body.get("toolConfig")
    calling = config.get("functionCallingConfig") if isinstance(config, dict) else None
    mode = calling.get("mode", "AUTO") if isinstance(calling, dict) else "AUTO"
    if mode == "NONE":
        return [], None, False
    if mode == "ANY":
        allowed = calling.get("allowedFunctionNames") if isinstance(calling, dict) else None
        chosen = allowed[0] if isinstance(allowed, list) and allowed else None
        if chosen is not None and chosen not in dict(tools):
            raise _invalid(f"allowedFunctionNames: {chosen!r} is not a declared function")
        return tools, chosen, True
    return tools, None, False


def _usage(prompt: int, reply_tokens: int, behaviour: Behaviour) -> dict[str, Any]:
    cached = min(behaviour.cached_tokens, prompt)
    thoughts = behaviour.reasoning_tokens
    usage: dict[str, Any] = {
        "promptTokenCount": prompt,
        "candidatesTokenCount": reply_tokens,
        "totalTokenCount": prompt + reply_tokens + thoughts,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}],
    }
    # The API leaves these counts out when they are zero.
    if cached:
        usage["cachedContentTokenCount"] = cached
    if thoughts:
        usage["thoughtsTokenCount"] = thoughts
    return usage


def _chunk(
    parts: list[dict[str, Any]],
    finish: str | None,
    usage: dict[str, Any] | None,
    model: str,
    response_id: str,
) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": 0}
    if finish is not None:
        candidate["finishReason"] = finish
    payload: dict[str, Any] = {"candidates": [candidate]}
    if usage is not None:
        payload["usageMetadata"] = usage
    payload["modelVersion"] = model
    payload["responseId"] = response_id
    return payload


def generate(call: Call, behaviour: Behaviour) -> Reply:
    """``:generateContent`` and ``:streamGenerateContent``."""
    body = call.body
    model = call.params["model"]
    if behaviour.strict_models and model not in behaviour.models:
        raise RequestError(
            404,
            f"models/{model} is not found for API version v1beta, or is not supported for generateContent.",
        )
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        raise _invalid("* GenerateContentRequest.contents: contents is not specified")
    config = body.get("generationConfig") or {}
    cap = config.get("maxOutputTokens") if isinstance(config, dict) else None
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise _invalid("Invalid value at 'generation_config.max_output_tokens'")
    tools, chosen, required = _tools(body)
    reply = plan(behaviour, cap, tools, chosen=chosen, required=required)
    prompt = tokens.count_gemini_prompt(body.get("systemInstruction"), contents)
    seed = [model, body.get("systemInstruction"), contents]
    response_id = identity_of("", seed, behaviour, separator="")[0]
    finish = "MAX_TOKENS" if reply.capped else "STOP"
    report = not behaviour.omit_usage
    if call.params["method"] == "streamGenerateContent":
        return _stream(
            reply, prompt, finish, model, response_id, behaviour, sse=call.query.get("alt") == "sse"
        )
    parts: list[dict[str, Any]] = []
    if reply.words or reply.tool is None:
        parts.append({"text": reply.text})
    if reply.tool is not None:
        parts.append({"functionCall": {"name": reply.tool.name, "args": reply.tool.arguments}})
    usage = _usage(prompt, reply.visible_tokens, behaviour) if report else None
    return JsonReply(orjson.dumps(_chunk(parts, finish, usage, model, response_id)))


def _stream(
    reply: Plan, prompt: int, finish: str, model: str, response_id: str, behaviour: Behaviour, *, sse: bool
) -> StreamReply:
    """One chunk per word, then the function call whole (Gemini does not split its arguments);
    the last chunk carries ``finishReason``. A reply of no words and no call is one empty-text chunk."""
    report = not behaviour.omit_usage
    # (parts, output tokens they add)
    pieces: list[tuple[list[dict[str, Any]], int]] = [([{"text": word}], 1) for word in reply.words]
    if reply.tool is not None:
        call = {"functionCall": {"name": reply.tool.name, "args": reply.tool.arguments}}
        pieces.append(([call], reply.tool.tokens))
    if not pieces:
        pieces.append(([{"text": ""}], 0))
    payloads: list[dict[str, Any]] = []
    spent = 0
    last = len(pieces) - 1
    for position, (parts, cost) in enumerate(pieces):
        spent += cost
        usage = _usage(prompt, spent, behaviour) if report else None
        payloads.append(_chunk(parts, finish if position == last else None, usage, model, response_id))
    if sse:
        events = [b"data: " + orjson.dumps(payload) + b"\r\n\r\n" for payload in payloads]
        return StreamReply(events, range(len(events)))
    # The JSON-array framing: Google pretty-prints its elements, compact ones are the same JSON
    # (a client must parse the array, not its lines).
    events = [
        (b"[" if index == 0 else b",\r\n") + orjson.dumps(payload) for index, payload in enumerate(payloads)
    ]
    events.append(b"]")
    return StreamReply(events, range(len(payloads)), _JSON_ARRAY_HEADERS)


def _match(path: str) -> Route | None:
    found = _PATH.fullmatch(path)
    if found is None:
        return None
    method = found.group(3)
    streams = Streams.ALWAYS if method == "streamGenerateContent" else Streams.NEVER
    return Route("POST", generate, {"model": found.group(2), "method": method}, streams)


DIALECT = Dialect("gemini", _match, _refuse, _error, _injected)
