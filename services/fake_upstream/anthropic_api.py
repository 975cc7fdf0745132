"""The Anthropic dialect: ``POST /v1/messages`` (streaming or not) and ``/v1/messages/count_tokens``.

Shapes follow Anthropic's public API documentation:

* Messages API (https://docs.anthropic.com/en/api/messages): request ``model``, ``max_tokens``,
  ``messages``, ``system``, ``tools`` / ``tool_choice``, ``stream``; reply ``id`` (``msg_...``),
  ``type: "message"``, ``role``, ``content`` blocks (``text``, ``tool_use``), ``stop_reason``
  (``end_turn``, ``max_tokens``, ``tool_use``), ``stop_sequence``, ``usage`` (``input_tokens``,
  ``output_tokens``, ``cache_creation_input_tokens``, ``cache_read_input_tokens``, and
  ``output_tokens_details.thinking_tokens``). ``input_tokens`` excludes the cached tokens, as the API
  reports it: the whole prompt is the sum of the three input counts.
* Streaming messages (https://docs.anthropic.com/en/docs/build-with-claude/streaming): named SSE
  events ``message_start``, ``content_block_start``, ``ping``, ``content_block_delta``
  (``text_delta`` / ``input_json_delta``), ``content_block_stop``, ``message_delta`` (stop reason
  and cumulative usage), ``message_stop``.
* Errors (https://docs.anthropic.com/en/api/errors): ``{"type": "error", "error": {"type",
  "message"}}`` with the type named for the status (``invalid_request_error`` 400,
  ``authentication_error`` 401, ``permission_error`` 403, ``not_found_error`` 404,
  ``rate_limit_error`` 429, ``api_error`` 500, ``overloaded_error`` 529, ...).
* Rate limits (https://docs.anthropic.com/en/api/rate-limits): a 429 carries ``retry-after`` and
  the ``anthropic-ratelimit-*`` headers.
* Versioning (https://docs.anthropic.com/en/api/versioning): the ``anthropic-version`` header is
  required. The docs list ``2023-06-01`` and ``2023-01-01``, but SDKs move to newer dated versions
  (``anthropic`` 2.10 sends ``2026-10-21``), so any ``YYYY-MM-DD`` date from 2023 on is accepted
  and anything else refused.

The key goes in ``x-api-key`` (curl, older SDKs) or ``Authorization: Bearer`` (the ``anthropic``
SDK 2.x sends its API key so); when the behaviour sets no ``api_key`` any non-empty key is
accepted, but one must be sent.
"""

from __future__ import annotations

import datetime
import re
from typing import Any

import orjson

from . import tokens
from .behaviour import Behaviour
from .dialect import Call, Dialect, Route, Streams, bearer_token
from .endpoints import JSON_HEADERS, JsonReply, Reply, RequestError, StreamReply, identity_of
from .generation import Plan, plan

_VERSION = re.compile(r"20(2[3-9]|[3-9]\d)-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])")

_ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}

_INJECTED_MESSAGES: dict[int, str] = {
    429: "Number of request tokens has exceeded your per-minute rate limit (injected).",
    500: "Internal server error (injected).",
    529: "Overloaded (injected).",
}

# A rate limit the fake pretends to have; only its shape matters.
_REQUESTS_LIMIT = b"50"


def error_body(status: int, message: str) -> bytes:
    error_type = _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return orjson.dumps({"type": "error", "error": {"type": error_type, "message": message}})


def _error(error: RequestError) -> JsonReply:
    return JsonReply(error_body(error.status, error.message), error.status)


def _injected(status: int, behaviour: Behaviour) -> JsonReply:
    headers = JSON_HEADERS
    if status == 429:
        reset = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=behaviour.retry_after)
        stamp = reset.strftime("%Y-%m-%dT%H:%M:%SZ").encode()
        headers = (
            *JSON_HEADERS,
            (b"retry-after", str(behaviour.retry_after).encode()),
            (b"anthropic-ratelimit-requests-limit", _REQUESTS_LIMIT),
            (b"anthropic-ratelimit-requests-remaining", b"0"),
            (b"anthropic-ratelimit-requests-reset", stamp),
        )
    message = _INJECTED_MESSAGES.get(status, "Injected failure.")
    return JsonReply(error_body(status, message), status, headers)


def _refuse(call: Call, behaviour: Behaviour) -> JsonReply | None:
    key = call.headers.get("x-api-key") or bearer_token(call.headers)
    if not key:
        return _error(RequestError(401, "x-api-key header is required"))
    if behaviour.api_key is not None and key != behaviour.api_key:
        return _error(RequestError(401, "invalid x-api-key"))
    version = call.headers.get("anthropic-version")
    if version is None:
        return _error(RequestError(400, "anthropic-version: header is required"))
    if _VERSION.fullmatch(version) is None:
        return _error(RequestError(400, f"anthropic-version: invalid version {version!r}"))
    return None


def _invalid(message: str) -> RequestError:
    return RequestError(400, message)


def _model(body: dict[str, Any], behaviour: Behaviour) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid("model: Field required")
    if behaviour.strict_models and model not in behaviour.models:
        raise RequestError(404, f"model: {model}")
    return model


def _messages(body: dict[str, Any]) -> list[Any]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages: at least one message is required")
    return messages


def _tools(body: dict[str, Any]) -> tuple[list[tuple[str, Any]], str | None, bool]:
    """The offered tools (name, input schema), the tool ``tool_choice`` forces, and whether it
    requires some call (``any``); ``tool_choice: none`` offers nothing."""
    raw = body.get("tools") or []
    if not isinstance(raw, list):
        raise _invalid("tools: Input should be a valid list")
    tools: list[tuple[str, Any]] = []
    for index, tool in enumerate(raw):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise _invalid(f"tools.{index}.name: Field required")
        tools.append((tool["name"], tool.get("input_schema")))
    choice = body.get("tool_choice")
    kind = choice.get("type") if isinstance(choice, dict) else "auto"
    if kind == "none":
        return [], None, False
    if kind == "tool":
        name = choice.get("name") if isinstance(choice, dict) else None
        if name not in dict(tools):
            raise _invalid(f"tool_choice.name: tool {name!r} is not among the tools")
        return tools, name, True
    return tools, None, kind == "any"


def _identity(body: dict[str, Any], behaviour: Behaviour) -> str:
    seed = [body.get("model"), body.get("system"), body.get("messages")]
    return identity_of("msg", seed, behaviour, separator="_")[0]


def _usage(prompt: int, output: int, behaviour: Behaviour) -> dict[str, Any]:
    uncached, read, written = tokens.split_prompt(
        prompt, behaviour.cached_tokens, behaviour.cache_write_tokens
    )
    usage: dict[str, Any] = {
        "input_tokens": uncached,
        "cache_creation_input_tokens": written,
        "cache_read_input_tokens": read,
        "output_tokens": output,
    }
    if behaviour.reasoning_tokens:
        usage["output_tokens_details"] = {"thinking_tokens": behaviour.reasoning_tokens}
    return usage


def _stop_reason(reply: Plan) -> str:
    if reply.capped:
        return "max_tokens"
    return "tool_use" if reply.tool is not None else "end_turn"


def messages(call: Call, behaviour: Behaviour) -> Reply:
    """``POST /v1/messages``."""
    body = call.body
    model = _model(body, behaviour)
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise _invalid("max_tokens: Field required (an integer >= 1)")
    conversation = _messages(body)
    tools, chosen, required = _tools(body)
    reply = plan(behaviour, max_tokens, tools, chosen=chosen, required=required)
    prompt = tokens.count_anthropic_prompt(body.get("system"), conversation)
    message_id = _identity(body, behaviour)
    tool_id = "toolu_" + message_id.removeprefix("msg_")
    output = reply.visible_tokens + behaviour.reasoning_tokens
    if body.get("stream") is True:
        return _stream(
            message_id, tool_id, model, reply, _usage(prompt, output, behaviour), prompt, behaviour
        )
    content: list[dict[str, Any]] = []
    if reply.words or reply.tool is None:
        content.append({"type": "text", "text": reply.text})
    if reply.tool is not None:
        content.append(
            {"type": "tool_use", "id": tool_id, "name": reply.tool.name, "input": reply.tool.arguments}
        )
    return JsonReply(
        orjson.dumps(
            {
                "id": message_id,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": content,
                "stop_reason": _stop_reason(reply),
                "stop_sequence": None,
                "usage": _usage(prompt, output, behaviour),
            }
        )
    )


def _event(kind: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def _block_start(index: int, block: dict[str, Any]) -> bytes:
    return _event(
        "content_block_start", {"type": "content_block_start", "index": index, "content_block": block}
    )


def _block_delta(index: int, delta: dict[str, Any]) -> bytes:
    return _event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})


def _block_stop(index: int) -> bytes:
    return _event("content_block_stop", {"type": "content_block_stop", "index": index})


def _stream(
    message_id: str,
    tool_id: str,
    model: str,
    reply: Plan,
    final_usage: dict[str, Any],
    prompt: int,
    behaviour: Behaviour,
) -> StreamReply:
    """The event sequence of the streaming docs: one ``text_delta`` per word, the tool call's input
    as one ``input_json_delta`` per argument (the pieces concatenate to its JSON)."""
    start_usage = _usage(prompt, 1, behaviour)  # the API reports a token or so before generating
    start_usage.pop("output_tokens_details", None)
    message: dict[str, Any] = {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": start_usage,
    }
    events = [_event("message_start", {"type": "message_start", "message": message})]
    content: set[int] = set()
    index = 0
    if reply.words or reply.tool is None:
        events.append(_block_start(index, {"type": "text", "text": ""}))
        events.append(_event("ping", {"type": "ping"}))
        for word in reply.words:
            content.add(len(events))
            events.append(_block_delta(index, {"type": "text_delta", "text": word}))
        events.append(_block_stop(index))
        index += 1
    if reply.tool is not None:
        events.append(
            _block_start(index, {"type": "tool_use", "id": tool_id, "name": reply.tool.name, "input": {}})
        )
        for piece in reply.tool.pieces:
            content.add(len(events))
            events.append(_block_delta(index, {"type": "input_json_delta", "partial_json": piece}))
        events.append(_block_stop(index))
    delta = {"stop_reason": _stop_reason(reply), "stop_sequence": None}
    events.append(_event("message_delta", {"type": "message_delta", "delta": delta, "usage": final_usage}))
    events.append(_event("message_stop", {"type": "message_stop"}))
    return StreamReply(events, frozenset(content))


def count_tokens(call: Call, behaviour: Behaviour) -> Reply:
    """``POST /v1/messages/count_tokens``: the prompt's input tokens, cache not considered."""
    body = call.body
    _model(body, behaviour)
    prompt = tokens.count_anthropic_prompt(body.get("system"), _messages(body))
    return JsonReply(orjson.dumps({"input_tokens": prompt}))


_ROUTES = {
    "/v1/messages": Route("POST", messages, {}, Streams.ON_REQUEST),
    "/v1/messages/count_tokens": Route("POST", count_tokens, {}),
}


def _match(path: str) -> Route | None:
    return _ROUTES.get(path)


DIALECT = Dialect("anthropic", _match, _refuse, _error, _injected)
