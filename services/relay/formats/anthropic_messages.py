"""Anthropic's Messages API (https://docs.anthropic.com/en/api/messages) over the chat pipeline: the
caller's request as an OpenAI chat body, and the chat answer as a Messages answer.

Request (each field checked, a 400 naming it otherwise):

* ``model``, ``max_tokens`` (required), ``temperature``, ``top_p`` (which older SDKs send),
  ``stop_sequences`` (→ ``stop``), ``metadata.user_id`` (→ ``user``), ``stream``,
  ``output_config.format`` (a JSON schema → ``response_format``);
* ``thinking`` (enabled with ``budget_tokens``, disabled, adaptive) → chat ``thinking`` as given, and
  ``output_config.effort`` → ``reasoning_effort`` (``xhigh`` and ``max`` as ``high``) when thinking is
  on: alone it is not forwarded, since the Anthropic and Gemini channels read ``reasoning_effort`` as
  a switch that turns thinking on;
* ``system`` as a string or text blocks (→ one system message: its text joined, or its text parts
  when a block carries ``cache_control``);
* ``messages`` with string or block content: ``text``; ``image`` from ``base64`` or ``url`` sources
  (→ ``image_url`` parts); ``document`` from a ``base64`` PDF (→ a ``file`` part, its ``title`` as the
  file name) or a ``text`` source (→ a text part); ``tool_use`` in assistant turns (→ ``tool_calls``);
  ``thinking`` and ``redacted_thinking`` in assistant turns (→ the message's ``thinking_blocks``,
  signatures kept: Anthropic needs them back when thinking and tool use continue a turn);
  ``tool_result`` in user turns (→ ``tool`` messages, placed before the turn's other blocks as
  OpenAI requires; images in a result follow as a user message, since tool messages carry text only);
* ``cache_control`` on system, text, image, document and ``tool_result`` blocks and on tools → the
  same mark on the chat part, tool message or tool; on a ``tool_use`` block → on its assistant
  message (chat's tool calls carry none; the call is the message's last block);
* ``tools`` (custom tools: name, description, input_schema → function tools) and ``tool_choice``
  (``auto``, ``any`` → ``required``, ``tool`` → the named function, ``none``;
  ``disable_parallel_tool_use`` → ``parallel_tool_calls: false``).

``thinking``, ``cache_control`` and ``thinking_blocks`` are the chat extensions the Anthropic and
Gemini channels honour; a body carrying them is marked so that OpenAI and Azure channels get it
without them (:mod:`services.relay.providers.extensions`).

Answer: the chat answer's ``thinking_blocks`` open the content as ``thinking`` (with its signature)
and ``redacted_thinking`` blocks; ``reasoning_content`` without them (a channel that signs nothing,
as Gemini) is one thinking block with an empty signature.

Accepted and not forwarded: ``top_k`` (chat has no such parameter), ``output_config.effort`` without
thinking, ``service_tier``, ``speed``, ``inference_geo``. Refused: server tools (web search, code
execution, ...), documents by URL or file id (the relay fetches nothing for a caller; send them as
base64), document citations, other block types, ``mcp_servers``, ``container``.
"""

from __future__ import annotations

from typing import Any

import orjson

from services.common.errors import InvalidRequest
from services.relay.formats.common import ChatUsage, chat_usage, items, obj, read_answer, refuse
from services.relay.pipeline.checks import (
    MAX_TOKENS,
    optional_array,
    optional_bool,
    optional_number,
    optional_object,
    optional_positive_int,
    require_model,
)
from services.relay.providers import extensions
from services.relay.providers.anthropic import COUNT_TOKENS_PATH
from services.relay.providers.content import OPENAI_TO_ANTHROPIC_STOP
from services.relay.settings import RelaySettings

__all__ = [
    "COUNT_FIELDS",
    "COUNT_TOKENS_PATH",
    "STOP_REASONS",
    "message_id",
    "thinking_block",
    "thinking_content",
    "to_anthropic",
    "to_chat",
    "usage_of",
]

# OpenAI finish_reason → Anthropic stop_reason (the table the Anthropic channels read the other way).
STOP_REASONS = OPENAI_TO_ANTHROPIC_STOP
_REFUSED_FIELDS = ("mcp_servers", "container")
_CHOICES = {"auto": "auto", "any": "required", "none": "none"}
# What Anthropic's token counting takes of a Messages request (it refuses max_tokens, stream, ...).
COUNT_FIELDS = frozenset({"model", "messages", "system", "tools", "tool_choice", "thinking"})
_THINKING = frozenset({"enabled", "disabled", "adaptive"})
# Anthropic's output_config.effort → chat's reasoning_effort.
_EFFORTS = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}


def _marked(block: dict[str, Any], target: dict[str, Any], param: str) -> dict[str, Any]:
    """``target`` with the ``cache_control`` mark of ``block``, when it has one."""
    control = block.get("cache_control")
    if control is not None:
        if not isinstance(control, dict) or control.get("type") != "ephemeral":
            field = param.split("[", 1)[0].split(".", 1)[0]
            raise refuse(
                f"'{param}.cache_control' must be {{\"type\": \"ephemeral\"}} (optionally with a 'ttl').",
                field,
            )
        target["cache_control"] = control
    return target


def _system(value: Any) -> str | list[dict[str, Any]]:
    """The system message's content: the text blocks joined by newlines, or kept as text parts when
    one carries a cache breakpoint (it must stay on its block)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for block in value:
            if (
                not isinstance(block, dict)
                or block.get("type") != "text"
                or not isinstance(block.get("text"), str)
            ):
                raise refuse("'system' blocks must be text blocks with a string 'text'.", "system")
            parts.append(_marked(block, {"type": "text", "text": block["text"]}, "system"))
        if any("cache_control" in part for part in parts):
            return parts
        return "\n".join(part["text"] for part in parts)
    raise refuse("'system' must be a string or an array of text blocks.", "system")


def _image(block: dict[str, Any], param: str) -> dict[str, Any]:
    source = block.get("source")
    if not isinstance(source, dict):
        raise refuse(f"'{param}.source' must be an object.", param)
    kind = source.get("type")
    if kind == "base64":
        media_type, data = source.get("media_type"), source.get("data")
        if not isinstance(media_type, str) or not isinstance(data, str):
            raise refuse(f"'{param}.source' needs string 'media_type' and 'data'.", param)
        url = f"data:{media_type};base64,{data}"
    elif kind == "url":
        given = source.get("url")
        if not isinstance(given, str):
            raise refuse(f"'{param}.source.url' must be a string.", param)
        url = given
    else:
        raise refuse(f"'{param}.source.type' must be 'base64' or 'url'.", param)
    return {"type": "image_url", "image_url": {"url": url}}


def _document(block: dict[str, Any], param: str) -> dict[str, Any]:
    """A ``document`` block as a chat part: a base64 PDF becomes a ``file`` part, plain text a text
    part. PDFs by URL are refused (the relay fetches nothing on a caller's behalf; OpenAI's file
    parts take inline data only), and so are uploaded files and citations (chat cannot carry them)."""
    source = block.get("source")
    if not isinstance(source, dict):
        raise refuse(f"'{param}.source' must be an object.", "messages")
    if obj(block.get("citations")).get("enabled") is True:
        raise refuse(f"'{param}.citations': citations are not supported by this gateway.", "messages")
    kind, data = source.get("type"), source.get("data")
    if kind == "base64" and source.get("media_type") == "application/pdf" and isinstance(data, str):
        title = block.get("title")
        name = title if isinstance(title, str) and title else "document.pdf"
        part = {
            "type": "file",
            "file": {"filename": name, "file_data": f"data:application/pdf;base64,{data}"},
        }
    elif kind == "text" and isinstance(data, str):
        part = {"type": "text", "text": data}
    else:
        raise refuse(
            f"'{param}.source' must be a base64 PDF (media_type application/pdf) or plain text; "
            "send PDFs by URL or file id as base64.",
            "messages",
        )
    return _marked(block, part, param)


def _thinking_block(block: dict[str, Any], param: str) -> dict[str, Any]:
    """A thinking block of an assistant turn, kept as it came (its signature is what lets Anthropic
    continue a turn with thinking and tools)."""
    if block["type"] == "thinking":
        thinking, signature = block.get("thinking"), block.get("signature")
        if not isinstance(thinking, str) or not isinstance(signature, str):
            raise refuse(f"'{param}' needs a string 'thinking' and 'signature'.", "messages")
        return {"type": "thinking", "thinking": thinking, "signature": signature}
    data = block.get("data")
    if not isinstance(data, str):
        raise refuse(f"'{param}.data' must be a string.", "messages")
    return {"type": "redacted_thinking", "data": data}


def _tool_call(block: dict[str, Any], param: str) -> dict[str, Any]:
    call_id, name, arguments = block.get("id"), block.get("name"), block.get("input", {})
    if not isinstance(call_id, str) or not isinstance(name, str) or not isinstance(arguments, dict):
        raise refuse(f"'{param}' needs a string 'id' and 'name' and an object 'input'.", param)
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": orjson.dumps(arguments).decode()},
    }


def _tool_results(block: dict[str, Any], param: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The tool message of a ``tool_result`` block, and the images it carried."""
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str):
        raise refuse(f"'{param}.tool_use_id' must be a string.", param)
    content = block.get("content", "")
    images: list[dict[str, Any]] = []
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        texts = []
        for index, part in enumerate(content):
            where = f"{param}.content[{index}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "image":
                images.append(_image(part, where))
            else:
                raise refuse(f"'{where}' must be a text or image block.", param)
        text = "\n".join(texts)
    else:
        raise refuse(f"'{param}.content' must be a string or an array of blocks.", param)
    if block.get("is_error") is True:
        text = f"Error: {text}" if text else "Error"
    # A tool message is one block: its mark is the message's.
    return _marked(block, {"role": "tool", "tool_call_id": call_id, "content": text}, param), images


def _turn(message: Any, index: int) -> list[dict[str, Any]]:
    """The chat messages of one Messages turn."""
    param = f"messages[{index}]"
    if not isinstance(message, dict):
        raise refuse(f"'{param}' must be an object.", "messages")
    role = message.get("role")
    if role not in ("user", "assistant"):
        raise refuse(f"'{param}.role' must be 'user' or 'assistant'.", "messages")
    content = message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise refuse(f"'{param}.content' must be a string or an array of blocks.", "messages")
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    thinking: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    result_images: list[dict[str, Any]] = []
    # A mark on a tool_use block: chat's tool calls carry none, so it goes on the message (whose last
    # block the call is, as Anthropic orders them).
    call_mark: dict[str, Any] = {}
    for position, block in enumerate(content):
        where = f"{param}.content[{position}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            if not isinstance(block.get("text"), str):
                raise refuse(f"'{where}.text' must be a string.", "messages")
            parts.append(_marked(block, {"type": "text", "text": block["text"]}, where))
        elif kind == "image" and role == "user":
            parts.append(_marked(block, _image(block, where), where))
        elif kind == "document" and role == "user":
            parts.append(_document(block, where))
        elif kind == "tool_use" and role == "assistant":
            calls.append(_tool_call(block, where))
            _marked(block, call_mark, where)
        elif kind == "tool_result" and role == "user":
            result, images = _tool_results(block, where)
            results.append(result)
            result_images.extend(images)
        elif kind in ("thinking", "redacted_thinking") and role == "assistant":
            thinking.append(_thinking_block(block, where))
        else:
            raise refuse(f"'{where}': a {role} turn cannot carry a {kind!r} block here.", "messages")
    turns: list[dict[str, Any]] = [*results]
    if result_images:
        turns.append({"role": "user", "content": result_images})
    if role == "assistant":
        text = "".join(p["text"] for p in parts)
        if calls or text or thinking or not turns:
            # Text parts stay parts only when one carries a cache breakpoint.
            marked = any("cache_control" in p for p in parts)
            turn: dict[str, Any] = {
                "role": "assistant",
                "content": parts if marked else text or (None if calls else ""),
            }
            if calls:
                turn["tool_calls"] = calls
            if thinking:
                turn["thinking_blocks"] = thinking
            turns.append({**turn, **call_mark})
    elif parts or not turns:
        turns.append({"role": "user", "content": parts})
    return turns


def _tools(body: dict[str, Any], limits: RelaySettings) -> list[dict[str, Any]] | None:
    optional_array(body, "tools", limits.max_tools)
    tools = body.get("tools")
    if tools is None:
        return None
    converted = []
    for index, tool in enumerate(tools):
        param = f"tools[{index}]"
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise refuse(f"'{param}' must be an object with a string 'name'.", "tools")
        if tool.get("type") not in (None, "custom"):
            raise refuse(f"'{param}': server tools ({tool['type']!r}) are not supported.", "tools")
        schema = tool.get("input_schema")
        if not isinstance(schema, dict):
            raise refuse(f"'{param}.input_schema' must be an object.", "tools")
        function: dict[str, Any] = {"name": tool["name"], "parameters": schema}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        converted.append(_marked(tool, {"type": "function", "function": function}, "tools"))
    return converted


def _tool_choice(body: dict[str, Any], chat: dict[str, Any]) -> None:
    optional_object(body, "tool_choice")
    choice = body.get("tool_choice")
    if choice is None:
        return
    kind = choice.get("type")
    if kind == "tool":
        if not isinstance(choice.get("name"), str):
            raise refuse("'tool_choice.name' must be a string.", "tool_choice")
        chat["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    elif isinstance(kind, str) and kind in _CHOICES:
        chat["tool_choice"] = _CHOICES[kind]
    else:
        raise refuse("'tool_choice.type' must be 'auto', 'any', 'tool' or 'none'.", "tool_choice")
    if choice.get("disable_parallel_tool_use") is True and "tools" in chat:
        chat["parallel_tool_calls"] = False


def _output_format(body: dict[str, Any], chat: dict[str, Any]) -> None:
    """``output_config.format`` (a JSON schema the answer must follow) as chat's ``response_format``."""
    optional_object(body, "output_config")
    fmt = (body.get("output_config") or {}).get("format")
    if fmt is None:
        return
    if (
        not isinstance(fmt, dict)
        or fmt.get("type") != "json_schema"
        or not isinstance(fmt.get("schema"), dict)
    ):
        raise refuse(
            "'output_config.format' must be a json_schema format with an object 'schema'.", "output_config"
        )
    chat["response_format"] = {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": fmt["schema"]},
    }


def _reasoning(body: dict[str, Any], chat: dict[str, Any]) -> None:
    """``thinking`` as given (the Anthropic provider judges its budget as Anthropic does), and
    ``output_config.effort`` as ``reasoning_effort`` alongside thinking that is on.

    Effort alone is not forwarded: the Anthropic and Gemini channels read ``reasoning_effort`` as a
    switch that turns thinking on, which a caller who sent no ``thinking`` did not ask for. With
    thinking on, ``thinking`` wins there, and an OpenAI channel gets the effort (``xhigh`` and
    ``max``, which chat does not have, as ``high``)."""
    optional_object(body, "thinking")
    thinking = body.get("thinking")
    if thinking is not None:
        kind = thinking.get("type")
        if not isinstance(kind, str) or kind not in _THINKING:
            raise refuse("'thinking.type' must be 'enabled', 'disabled' or 'adaptive'.", "thinking")
        budget = thinking.get("budget_tokens")
        if kind == "enabled" and (isinstance(budget, bool) or not isinstance(budget, int)):
            raise refuse("'thinking.budget_tokens' must be an integer.", "thinking")
        chat["thinking"] = thinking
    effort = obj(body.get("output_config")).get("effort")
    if effort is None:
        return
    if not isinstance(effort, str) or effort not in _EFFORTS:
        raise refuse("'output_config.effort' must be low, medium, high, xhigh or max.", "output_config")
    if thinking is not None and thinking["type"] != "disabled":
        chat["reasoning_effort"] = _EFFORTS[effort]


def to_chat(body: dict[str, Any], limits: RelaySettings) -> dict[str, Any]:
    """The OpenAI chat body for the Messages request ``body``; raises a 400 naming the bad field."""
    model = require_model(body)
    if body.get("max_tokens") is None:
        raise InvalidRequest("'max_tokens' is required.", param="max_tokens")
    max_tokens = optional_positive_int(body, "max_tokens", MAX_TOKENS)
    for field in _REFUSED_FIELDS:
        if body.get(field) is not None:
            raise refuse(f"'{field}' is not supported by this gateway.", field)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise refuse("'messages' must be a non-empty array.", "messages")
    if len(messages) > limits.max_messages:
        raise refuse(f"'messages' has more than {limits.max_messages} items.", "messages")
    chat_messages: list[dict[str, Any]] = []
    if body.get("system") is not None:
        chat_messages.append({"role": "system", "content": _system(body["system"])})
    for index, message in enumerate(messages):
        chat_messages.extend(_turn(message, index))
    chat: dict[str, Any] = {"model": model, "messages": chat_messages, "max_tokens": max_tokens}
    for field in ("temperature", "top_p", "top_k"):
        optional_number(body, field)
    for field in ("temperature", "top_p"):
        if body.get(field) is not None:
            chat[field] = body[field]
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise refuse("'stop_sequences' must be an array of strings.", "stop_sequences")
        if stops:
            chat["stop"] = stops
    optional_object(body, "metadata")
    user = (body.get("metadata") or {}).get("user_id")
    if user is not None:
        if not isinstance(user, str):
            raise refuse("'metadata.user_id' must be a string.", "metadata")
        chat["user"] = user
    tools = _tools(body, limits)
    if tools:
        chat["tools"] = tools
    _tool_choice(body, chat)
    _output_format(body, chat)
    _reasoning(body, chat)
    if optional_bool(body, "stream"):
        # The usage chunk is what message_delta reports, so it is asked for in every case.
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return extensions.mark(chat)


def message_id(chat_id: Any) -> str:
    """An Anthropic-looking id for the chat answer ``chat_id``."""
    text = chat_id if isinstance(chat_id, str) and chat_id else "unknown"
    return text if text.startswith("msg_") else "msg_" + text.removeprefix("chatcmpl-")


def usage_of(usage: ChatUsage | None) -> dict[str, Any]:
    """Anthropic's usage object: ``input_tokens`` excludes the tokens read from or written to the
    cache; ``output_tokens`` includes thinking, which ``output_tokens_details`` reports apart."""
    usage = usage or ChatUsage()
    found: dict[str, Any] = {
        "input_tokens": usage.uncached_prompt,
        "output_tokens": usage.output,
        "cache_read_input_tokens": usage.cache_read,
        "cache_creation_input_tokens": usage.cache_write,
    }
    if usage.reasoning:
        found["output_tokens_details"] = {"thinking_tokens": usage.reasoning}
    return found


def tool_input(arguments: Any) -> dict[str, Any]:
    """A tool call's arguments as the object Anthropic's ``input`` must be (``{}`` if unreadable)."""
    if isinstance(arguments, dict):
        return arguments
    if isinstance(arguments, str) and arguments:
        try:
            parsed = orjson.loads(arguments)
        except orjson.JSONDecodeError:
            return {}
        return parsed if isinstance(parsed, dict) else {}
    return {}


def thinking_block(block: Any) -> dict[str, Any] | None:
    """One of chat's ``thinking_blocks`` as Anthropic's block (None for what is neither kind)."""
    kind = block.get("type") if isinstance(block, dict) else None
    if kind == "thinking":
        signature = block.get("signature")
        return {
            "type": "thinking",
            "thinking": str(block.get("thinking") or ""),
            "signature": signature if isinstance(signature, str) else "",
        }
    if kind == "redacted_thinking":
        return {"type": "redacted_thinking", "data": str(block.get("data") or "")}
    return None


def thinking_content(message: dict[str, Any]) -> list[dict[str, Any]]:
    """The thinking blocks that open the answer's content: the answer's signed ``thinking_blocks``,
    else its ``reasoning_content`` as one unsigned block (a channel that signs nothing, as Gemini)."""
    blocks = [found for found in map(thinking_block, items(message.get("thinking_blocks"))) if found]
    if blocks:
        return blocks
    reasoning = message.get("reasoning_content")
    if isinstance(reasoning, str) and reasoning:
        return [{"type": "thinking", "thinking": reasoning, "signature": ""}]
    return []


def to_anthropic(answer: bytes, model: str) -> bytes:
    """The Messages answer for the chat answer ``answer`` (its first choice)."""
    parsed = read_answer(answer)
    choices = parsed.get("choices") if isinstance(parsed, dict) else None
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    message = obj(choice.get("message"))
    content = thinking_content(message)
    text = message.get("content")
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    for call in items(message.get("tool_calls")):
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            content.append(
                {
                    "type": "tool_use",
                    "id": call.get("id") or "",
                    "name": function.get("name") or "",
                    "input": tool_input(function.get("arguments")),
                }
            )
    reason = choice.get("finish_reason")
    return orjson.dumps(
        {
            "id": message_id(parsed.get("id")),
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": STOP_REASONS.get(reason, "end_turn") if isinstance(reason, str) else "end_turn",
            "stop_sequence": None,
            "usage": usage_of(chat_usage(parsed.get("usage"))),
        }
    )
