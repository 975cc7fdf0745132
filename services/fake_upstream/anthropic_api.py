"""The Anthropic dialect: ``POST /v1/messages`` (streaming or not) and ``/v1/messages/count_tokens``.

Shapes follow Anthropic's public API documentation:

* Messages API (https://docs.anthropic.com/en/api/messages): request ``model``, ``max_tokens``,
  ``messages``, ``system``, ``tools`` / ``tool_choice``, ``stream``; reply ``id`` (``msg_...``),
  ``type: "message"``, ``role``, ``content`` blocks (``thinking``, ``redacted_thinking``, ``text``,
  ``tool_use``), ``stop_reason``
  (``end_turn``, ``max_tokens``, ``tool_use``), ``stop_sequence``, ``usage`` (``input_tokens``,
  ``output_tokens``, ``cache_creation_input_tokens``, ``cache_read_input_tokens``, and
  ``output_tokens_details.thinking_tokens``). ``input_tokens`` excludes the cached tokens, as the API
  reports it: the whole prompt is the sum of the three input counts.
* Streaming messages (https://docs.anthropic.com/en/docs/build-with-claude/streaming): named SSE
  events ``message_start``, ``content_block_start``, ``ping``, ``content_block_delta``
  (``text_delta`` / ``input_json_delta`` / ``thinking_delta`` / ``signature_delta``),
  ``content_block_stop``, ``message_delta`` (stop reason and cumulative usage), ``message_stop``.
* Extended thinking (https://docs.anthropic.com/en/docs/build-with-claude/extended-thinking, the
  SDK's ``ThinkingConfigEnabledParam``: "Must be ≥1024 and less than ``max_tokens``"): ``thinking``
  ``enabled`` (with ``budget_tokens``), ``adaptive`` or ``disabled``. A thinking reply opens with a
  signed ``thinking`` block (``redacted_thinking`` when the behaviour says so); refused with 400 as
  the API refuses them: a budget under 1024 or not under ``max_tokens``, ``temperature`` other than 1,
  ``top_k``, ``top_p`` under 0.95 (what the docs say of the models that take manual thinking; the
  ``anthropic`` SDK 2.x has no sampling parameters at all, newer models refusing them whatever the
  thinking), a ``tool_choice`` forcing a call, and a turn continued by tool
  results whose assistant message does not start with a thinking block. A ``thinking`` block sent
  back without its signature, or with one that is not the block's, is refused whether or not the
  request thinks (see :mod:`.thinking`).
* Prompt caching (https://docs.anthropic.com/en/docs/build-with-claude/prompt-caching):
  ``cache_control`` (``ephemeral``, ``ttl`` 5m or 1h) on tools, system blocks and message blocks,
  or at the top level (the SDK's automatic caching: the last cacheable block), at most four. The
  cache counts stay the behaviour's ``cached_tokens`` / ``cache_write_tokens`` whatever the
  breakpoints (a fake with a real prefix cache would make every test depend on the requests before
  it).
* PDF support (https://docs.anthropic.com/en/docs/build-with-claude/pdf-support): ``document``
  blocks with a base64 ``application/pdf``, URL or text source; like images they add no tokens.
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

import base64
import binascii
import datetime
import re
from typing import Any

import orjson

from . import thinking, tokens
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


_THINKING_DOCS = "https://docs.claude.com/en/docs/build-with-claude/extended-thinking"
_CACHE_TTLS = ("5m", "1h")
_MAX_BREAKPOINTS = 4


def _thinking(body: dict[str, Any], max_tokens: int, forced_tool: bool) -> bool:
    """Whether the request thinks; refuses what the extended-thinking docs say thinking cannot take:
    a budget under 1024 or not under ``max_tokens``, a ``temperature`` other than 1, ``top_k``, a
    ``top_p`` under 0.95, and a ``tool_choice`` that forces a call."""
    thinking = body.get("thinking")
    if thinking is None:
        return False
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind not in ("enabled", "disabled", "adaptive"):
        raise _invalid(
            f"thinking.type: Input tag {kind!r} found using 'type' does not match any of the expected "
            "tags: 'adaptive', 'disabled', 'enabled'"
        )
    if kind == "disabled":
        return False
    if kind == "enabled":
        budget = thinking.get("budget_tokens")
        if isinstance(budget, bool) or not isinstance(budget, int):
            raise _invalid("thinking.enabled.budget_tokens: Field required")
        if budget < 1024:
            raise _invalid("thinking.enabled.budget_tokens: Input should be greater than or equal to 1024")
        if budget >= max_tokens:
            raise _invalid(
                "`max_tokens` must be greater than `thinking.budget_tokens`. Please consult our "
                f"documentation at {_THINKING_DOCS}#max-tokens-and-context-window-size"
            )
    temperature = body.get("temperature")
    if temperature is not None and temperature != 1:
        raise _invalid(
            "`temperature` may only be set to 1 when thinking is enabled. Please consult our "
            f"documentation at {_THINKING_DOCS}#feature-compatibility"
        )
    if body.get("top_k") is not None:
        raise _invalid(f"`top_k` must be unset when thinking is enabled. See {_THINKING_DOCS}")
    top_p = body.get("top_p")
    if isinstance(top_p, int | float) and top_p < 0.95:
        raise _invalid(f"`top_p` must be >= 0.95 or unset when thinking is enabled. See {_THINKING_DOCS}")
    if forced_tool:
        raise _invalid("Thinking may not be enabled when tool_choice forces tool use.")
    return True


def _check_cache_control(where: str, block: dict[str, Any], breakpoints: list[str]) -> None:
    control = block.get("cache_control")
    if control is None:
        return
    if not isinstance(control, dict) or control.get("type") != "ephemeral":
        raise _invalid(f"{where}.cache_control.type: Input should be 'ephemeral'")
    if control.get("ttl", "5m") not in _CACHE_TTLS:
        raise _invalid(f"{where}.cache_control.ttl: Input should be '5m' or '1h'")
    breakpoints.append(where)


def _check_document(where: str, block: dict[str, Any]) -> None:
    """A ``document`` block (https://docs.anthropic.com/en/docs/build-with-claude/pdf-support): a
    base64 PDF, a PDF URL or plain text."""
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64" and isinstance(source, dict):
        if source.get("media_type") != "application/pdf":
            raise _invalid(f"{where}.source.base64.media_type: Input should be 'application/pdf'")
        try:
            base64.b64decode(str(source.get("data") or ""), validate=True)
        except binascii.Error:
            raise _invalid(f"{where}.source.base64.data: invalid base64 data") from None
    elif kind not in ("url", "text"):
        raise _invalid(f"{where}.source: Input tag {kind!r} does not match any of the expected tags")


def _check_thinking_block(where: str, block: dict[str, Any]) -> None:
    """A thinking block sent back must carry the signature it came with, unchanged."""
    signature = block.get("signature")
    if not isinstance(signature, str):
        raise _invalid(f"{where}.thinking.signature: Field required")
    if not thinking.valid_signature(str(block.get("thinking") or ""), signature):
        raise _invalid(f"{where}: Invalid `signature` in `thinking` block")


def _check_content(body: dict[str, Any], conversation: list[Any], thinks: bool) -> None:
    """Block-level checks: cache breakpoints (at most four, ephemeral), documents, the signatures of
    thinking blocks sent back, and, when thinking, the thinking block that must open an assistant
    turn continued by tool results."""
    breakpoints: list[str] = []
    # The top-level one marks the last cacheable block for the caller (automatic caching).
    _check_cache_control("request", body, breakpoints)
    for index, tool in enumerate(body.get("tools") or ()):
        if isinstance(tool, dict):
            _check_cache_control(f"tools.{index}", tool, breakpoints)
    system = body.get("system")
    for index, block in enumerate(system if isinstance(system, list) else ()):
        if isinstance(block, dict):
            _check_cache_control(f"system.{index}", block, breakpoints)
    for position, message in enumerate(conversation):
        content = message.get("content") if isinstance(message, dict) else None
        for index, block in enumerate(content if isinstance(content, list) else ()):
            if not isinstance(block, dict):
                continue
            where = f"messages.{position}.content.{index}"
            _check_cache_control(where, block, breakpoints)
            kind = block.get("type")
            if kind == "document":
                _check_document(where, block)
            elif kind == "thinking":
                _check_thinking_block(where, block)
    if len(breakpoints) > _MAX_BREAKPOINTS:
        raise _invalid(
            f"A maximum of {_MAX_BREAKPOINTS} blocks with cache_control may be provided. "
            f"Found {len(breakpoints)}."
        )
    if thinks:
        _check_continued_turn(conversation)


def _check_continued_turn(conversation: list[Any]) -> None:
    last = conversation[-1] if conversation else None
    content = last.get("content") if isinstance(last, dict) else None
    if not isinstance(content, list) or not any(
        isinstance(b, dict) and b.get("type") == "tool_result" for b in content
    ):
        return
    position = len(conversation) - 2
    turn = conversation[position] if position >= 0 else None
    blocks = turn.get("content") if isinstance(turn, dict) and turn.get("role") == "assistant" else None
    if not isinstance(blocks, list) or not blocks:
        return
    first = blocks[0].get("type") if isinstance(blocks[0], dict) else None
    if first not in ("thinking", "redacted_thinking"):
        raise _invalid(
            f"messages.{position}.content.0.type: Expected `thinking` or `redacted_thinking`, but found "
            f"`{first}`. When `thinking` is enabled, a final `assistant` message must start with a "
            "thinking block (preceeding the lastmost set of `tool_use` and `tool_result` blocks). We "
            "recommend you include thinking blocks from previous turns. To avoid this requirement, "
            f"disable `thinking`. Please consult our documentation at {_THINKING_DOCS}"
        )


def _thinking_block(behaviour: Behaviour) -> dict[str, Any]:
    text = thinking.thinking_text(behaviour.reasoning_tokens)
    if behaviour.redacted_thinking:
        return {"type": "redacted_thinking", "data": thinking.redacted_data(text)}
    return {"type": "thinking", "thinking": text, "signature": thinking.signature_of(text)}


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
    thinks = _thinking(body, max_tokens, required)
    _check_content(body, conversation, thinks)
    reply = plan(behaviour, max_tokens, tools, chosen=chosen, required=required)
    prompt = tokens.count_anthropic_prompt(body.get("system"), conversation)
    message_id = _identity(body, behaviour)
    tool_id = "toolu_" + message_id.removeprefix("msg_")
    output = reply.visible_tokens + behaviour.reasoning_tokens
    if body.get("stream") is True:
        return _stream(
            message_id, tool_id, model, reply, _usage(prompt, output, behaviour), prompt, behaviour, thinks
        )
    content: list[dict[str, Any]] = [_thinking_block(behaviour)] if thinks else []
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
    thinks: bool,
) -> StreamReply:
    """The event sequence of the streaming docs: when thinking, a ``thinking`` block first (one
    ``thinking_delta`` per word, then its ``signature_delta``) or a ``redacted_thinking`` block
    whole; one ``text_delta`` per word, the tool call's input as one ``input_json_delta`` per
    argument (the pieces concatenate to its JSON)."""
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
    if thinks:
        block = _thinking_block(behaviour)
        if block["type"] == "redacted_thinking":
            content.add(len(events))
            events.append(_block_start(index, block))
        else:
            events.append(_block_start(index, {"type": "thinking", "thinking": "", "signature": ""}))
            for word in thinking.thinking_words(behaviour.reasoning_tokens):
                content.add(len(events))
                events.append(_block_delta(index, {"type": "thinking_delta", "thinking": word}))
            events.append(_block_delta(index, {"type": "signature_delta", "signature": block["signature"]}))
        events.append(_block_stop(index))
        index += 1
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
