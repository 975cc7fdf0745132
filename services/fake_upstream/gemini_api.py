"""The Gemini dialect: ``POST /v1beta/models/{model}:generateContent`` and ``:streamGenerateContent``.

Shapes follow the Gemini API reference (https://ai.google.dev/api/generate-content):

* request ``contents`` (``role`` + ``parts``; ``inlineData`` of an image, audio, video, text or PDF
  type in base64, https://ai.google.dev/gemini-api/docs/document-processing), ``systemInstruction``,
  ``generationConfig`` (``maxOutputTokens``; ``thinkingConfig`` with ``thinkingBudget``, 0 off and -1
  dynamic, and ``includeThoughts``, https://ai.google.dev/gemini-api/docs/thinking), ``tools``
  (``functionDeclarations`` with ``parameters`` or ``parametersJsonSchema``) and
  ``toolConfig.functionCallingConfig`` (``mode`` ``AUTO`` / ``ANY`` / ``NONE``,
  ``allowedFunctionNames``);
* reply ``candidates`` (``content.parts`` with ``text`` and ``functionCall`` parts, ``role:
  "model"``, ``finishReason`` ``STOP`` / ``MAX_TOKENS``, ``index``), ``usageMetadata``
  (``promptTokenCount``, which includes ``cachedContentTokenCount``; ``candidatesTokenCount``;
  ``thoughtsTokenCount``, outside the candidates' count; ``totalTokenCount``, the sum of prompt,
  candidates and thoughts), ``modelVersion``, ``responseId``;
* thinking: with ``includeThoughts`` the reply's parts open with the thoughts (``text`` parts with
  ``thought: true``); a thinking model's ``functionCall`` parts carry a ``thoughtSignature``, which
  must come back on the function calls of the current turn (after the last user text), as Gemini 3
  requires (https://ai.google.dev/gemini-api/docs/thought-signatures): a missing or altered one is
  refused with 400 (see :mod:`.thinking`);
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

import base64
import binascii
import re
from typing import Any

import orjson

from . import thinking, tokens
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


_SIGNATURE_DOCS = "https://ai.google.dev/gemini-api/docs/thought-signatures"
# inlineData types the API takes (https://ai.google.dev/gemini-api/docs/document-processing and the
# image, audio and video pages).
_INLINE_TYPES = ("image/", "audio/", "video/", "text/", "application/pdf")


def _thinking(config: Any) -> tuple[bool, bool]:
    """(whether the model thinks, whether it shows its thoughts) for ``generationConfig``.
    A ``thinkingBudget`` of 0 turns thinking off, -1 lets the model choose."""
    thinking = config.get("thinkingConfig") if isinstance(config, dict) else None
    if thinking is None:
        return False, False
    if not isinstance(thinking, dict):
        raise _invalid("Invalid value at 'generation_config.thinking_config'")
    # Google's JSON takes snake_case names too (the SDK sends the config's own fields so).
    budget = thinking.get("thinkingBudget", thinking.get("thinking_budget", -1))
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < -1:
        raise _invalid("Invalid value at 'generation_config.thinking_config.thinking_budget'")
    include = thinking.get("includeThoughts", thinking.get("include_thoughts", False))
    if not isinstance(include, bool):
        raise _invalid("Invalid value at 'generation_config.thinking_config.include_thoughts'")
    thinks = budget != 0
    return thinks, thinks and include


def _check_parts(contents: list[Any], thinks: bool) -> None:
    """``inlineData`` of a type the API takes, in base64; when thinking, every ``functionCall`` part
    of the current turn (after the last user text) carrying the ``thoughtSignature`` it came with."""
    turn_start = 0
    for position, content in enumerate(contents):
        parts = content.get("parts") if isinstance(content, dict) else None
        for part in parts if isinstance(parts, list) else ():
            if not isinstance(part, dict):
                continue
            # Google's JSON takes snake_case names too (the SDK sends the Blob's fields so).
            inline = part.get("inlineData", part.get("inline_data"))
            if isinstance(inline, dict):
                mime = str(inline.get("mimeType", inline.get("mime_type")) or "")
                if not mime.startswith(_INLINE_TYPES):
                    raise _invalid(f"Unsupported MIME type: {mime}")
                try:
                    base64.b64decode(str(inline.get("data") or ""), validate=True)
                except binascii.Error:
                    raise _invalid(
                        "Invalid value at 'contents.parts.inline_data.data': invalid base64"
                    ) from None
            if content.get("role") == "user" and "text" in part:
                turn_start = position
    if not thinks:
        return
    for position, content in enumerate(contents[turn_start:], start=turn_start):
        if not isinstance(content, dict) or content.get("role") != "model":
            continue
        for part in content.get("parts") or ():
            call = part.get("functionCall") if isinstance(part, dict) else None
            if not isinstance(call, dict):
                continue
            name = str(call.get("name") or "")
            if not thinking.signed_call(name, call.get("args") or {}, part.get("thoughtSignature")):
                raise _invalid(
                    "Function call is missing a thought_signature in functionCall parts. This is "
                    "required for tools to work correctly, and missing thought_signature may lead to "
                    f"degraded model performance. Additional data, function call `default_api:{name}` , "
                    f"position {position + 1}. Please refer to {_SIGNATURE_DOCS} for more details."
                )


def _call_part(reply: Plan, thinks: bool) -> dict[str, Any]:
    assert reply.tool is not None
    part: dict[str, Any] = {"functionCall": {"name": reply.tool.name, "args": reply.tool.arguments}}
    if thinks:
        part["thoughtSignature"] = thinking.call_signature(reply.tool.name, reply.tool.arguments)
    return part


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
    thinks, shows = _thinking(config)
    _check_parts(contents, thinks)
    reply = plan(behaviour, cap, tools, chosen=chosen, required=required)
    prompt = tokens.count_gemini_prompt(body.get("systemInstruction"), contents)
    seed = [model, body.get("systemInstruction"), contents]
    response_id = identity_of("", seed, behaviour, separator="")[0]
    finish = "MAX_TOKENS" if reply.capped else "STOP"
    report = not behaviour.omit_usage
    if call.params["method"] == "streamGenerateContent":
        return _stream(
            reply,
            prompt,
            finish,
            model,
            response_id,
            behaviour,
            sse=call.query.get("alt") == "sse",
            thinks=thinks,
            shows=shows,
        )
    parts: list[dict[str, Any]] = []
    if shows:
        parts.append({"text": thinking.thinking_text(behaviour.reasoning_tokens), "thought": True})
    if reply.words or reply.tool is None:
        parts.append({"text": reply.text})
    if reply.tool is not None:
        parts.append(_call_part(reply, thinks))
    usage = _usage(prompt, reply.visible_tokens, behaviour) if report else None
    return JsonReply(orjson.dumps(_chunk(parts, finish, usage, model, response_id)))


def _stream(
    reply: Plan,
    prompt: int,
    finish: str,
    model: str,
    response_id: str,
    behaviour: Behaviour,
    *,
    sse: bool,
    thinks: bool,
    shows: bool,
) -> StreamReply:
    """One chunk per thought word (``thought: true``, when shown), then one per word, then the
    function call whole (Gemini does not split its arguments); the last chunk carries
    ``finishReason``. A reply of no words and no call is one empty-text chunk."""
    report = not behaviour.omit_usage
    # (parts, output tokens they add); thoughts are counted apart, in every chunk's usage.
    pieces: list[tuple[list[dict[str, Any]], int]] = []
    if shows:
        pieces += [
            ([{"text": word, "thought": True}], 0)
            for word in thinking.thinking_words(behaviour.reasoning_tokens)
        ]
    pieces += [([{"text": word}], 1) for word in reply.words]
    if reply.tool is not None:
        pieces.append(([_call_part(reply, thinks)], reply.tool.tokens))
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
