"""OpenAI's Responses API (https://platform.openai.com/docs/api-reference/responses) over the chat
pipeline, with ``store=false`` semantics: nothing is kept on the server, so every request carries its
whole conversation.

Request (each field checked, a 400 naming it otherwise):

* ``model``, ``instructions`` (→ a system message), ``max_output_tokens`` (→ ``max_tokens``),
  ``temperature``, ``top_p``, ``user``, ``parallel_tool_calls``, ``stream``;
* ``input`` as a string or items: messages (roles ``user``, ``assistant``, ``system``, ``developer``,
  the last sent as ``system``) whose content is a string or ``input_text`` / ``output_text`` /
  ``refusal`` / ``input_image`` (by URL or data URL) parts; ``function_call`` items (→ assistant
  ``tool_calls``) and ``function_call_output`` items (→ ``tool`` messages); ``reasoning`` items
  that carry ``encrypted_content`` (as this gateway's do) → ``thinking_blocks`` of the assistant
  message that follows them, others dropped (without it there is nothing a channel could verify);
* ``reasoning.effort`` → ``reasoning_effort`` (OpenAI's values; ``summary`` is not forwarded);
* ``tools`` of type ``function`` and ``tool_choice`` (``auto``, ``none``, ``required``, a named function);
* ``text.format``: ``text``, ``json_object``, ``json_schema`` (→ ``response_format``).

Refused with a 400, as they need state on the server or tools the chat pipeline cannot run:
``previous_response_id``, ``conversation``, ``store: true``, ``background: true``, ``prompt``
(stored prompts), ``item_reference`` items, ``input_file`` and file ids, built-in tools (web and file
search, computer use, code interpreter, image generation, MCP, ...). ``include``, ``truncation``,
``metadata``, ``service_tier`` are accepted and not forwarded.

Answer: a ``reasoning`` output item per thinking block of the chat answer, before the message and
function calls, its text as the ``summary`` (one ``summary_text``, as OpenAI answers with
``reasoning.summary`` set, whether or not it was asked for) and its signature as its
``encrypted_content`` (a redacted block's data after ``redacted_thinking:``), so a caller that sends
the output back as input, as store=false requires, sends the thinking back signed;
``reasoning_content`` without signed blocks is one item without ``encrypted_content``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import orjson

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
from services.relay.settings import RelaySettings

__all__ = [
    "ResponseShape",
    "function_call_item",
    "message_item",
    "reasoning_item",
    "reasoning_items",
    "response_object",
    "to_chat",
    "to_response",
    "usage_of",
]

# Fields whose meaning depends on state the gateway does not keep.
_STATEFUL = {
    "previous_response_id": "previous_response_id needs responses stored on the server",
    "conversation": "conversations are stored on the server",
    "prompt": "stored prompts live on the server",
}
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_TEXT_PARTS = frozenset({"input_text", "output_text", "text", "refusal"})
# OpenAI's reasoning efforts (chat's reasoning_effort takes the same).
_EFFORTS = frozenset({"none", "minimal", "low", "medium", "high", "xhigh"})
# What opens a reasoning item's encrypted_content when it carries a redacted thinking block's data
# (a signed thinking block's is its signature): ':' is in neither.
_REDACTED = "redacted_thinking:"
_STATELESS_HINT = "This gateway serves the Responses API without server-side state (store=false)"


@dataclass(slots=True)
class ResponseShape:
    """What the Response object repeats of the request, and the ids it is given."""

    response_id: str
    model: str
    created_at: int = field(default_factory=lambda: int(time.time()))
    instructions: Any = None
    tools: list[Any] = field(default_factory=list)
    tool_choice: Any = "auto"
    parallel_tool_calls: bool = True
    max_output_tokens: int | None = None
    temperature: Any = None
    top_p: Any = None
    text_format: Any = None
    user: Any = None
    metadata: Any = None

    @classmethod
    def of(cls, body: dict[str, Any], response_id: str) -> ResponseShape:
        parallel = body.get("parallel_tool_calls")
        return cls(
            response_id=response_id,
            model=str(body.get("model", "")),
            instructions=body.get("instructions"),
            tools=list(body.get("tools") or []),
            tool_choice=body.get("tool_choice") or "auto",
            parallel_tool_calls=parallel if isinstance(parallel, bool) else True,
            max_output_tokens=body.get("max_output_tokens"),
            temperature=body.get("temperature"),
            top_p=body.get("top_p"),
            text_format=(body.get("text") or {}).get("format"),
            user=body.get("user"),
            metadata=body.get("metadata"),
        )


def _refuse_stateful(body: dict[str, Any]) -> None:
    for name, why in _STATEFUL.items():
        if body.get(name) is not None:
            raise refuse(f"'{name}' is not supported: {why}. {_STATELESS_HINT}: send the whole input.", name)
    if body.get("store") is True:
        raise refuse(f"'store': true is not supported. {_STATELESS_HINT}; send store=false.", "store")
    if body.get("background") is True:
        raise refuse(f"'background': true is not supported. {_STATELESS_HINT}.", "background")


def _image(part: dict[str, Any], param: str) -> dict[str, Any]:
    url = part.get("image_url")
    if not isinstance(url, str):
        raise refuse(f"'{param}': images are accepted by 'image_url' only (no file ids).", "input")
    image: dict[str, Any] = {"url": url}
    if isinstance(part.get("detail"), str):
        image["detail"] = part["detail"]
    return {"type": "image_url", "image_url": image}


def _content(content: Any, param: str) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise refuse(f"'{param}.content' must be a string or an array of parts.", "input")
    parts: list[dict[str, Any]] = []
    for index, part in enumerate(content):
        where = f"{param}.content[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if isinstance(kind, str) and kind in _TEXT_PARTS:
            text = part.get("text", part.get("refusal"))
            if not isinstance(text, str):
                raise refuse(f"'{where}.text' must be a string.", "input")
            parts.append({"type": "text", "text": text})
        elif kind == "input_image":
            parts.append(_image(part, where))
        else:
            raise refuse(f"'{where}': content parts of type {kind!r} are not supported.", "input")
    return parts


def _flat(content: str | list[dict[str, Any]]) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content)


def _thinking(item: dict[str, Any], param: str) -> dict[str, Any] | None:
    """The thinking block a ``reasoning`` input item stands for (see :func:`reasoning_item`); None
    for an item without ``encrypted_content`` (nothing a channel could verify)."""
    sealed = item.get("encrypted_content")
    if sealed is None or sealed == "":
        return None
    if not isinstance(sealed, str):
        raise refuse(f"'{param}.encrypted_content' must be a string.", "input")
    if sealed.startswith(_REDACTED):
        return {"type": "redacted_thinking", "data": sealed.removeprefix(_REDACTED)}
    texts = []
    for part in items(item.get("summary")):
        text = part.get("text") if isinstance(part, dict) else None
        if not isinstance(text, str):
            raise refuse(f"'{param}.summary' must be an array of summary_text parts.", "input")
        texts.append(text)
    return {"type": "thinking", "thinking": "".join(texts), "signature": sealed}


def _item(item: Any, index: int, messages: list[dict[str, Any]], thinking: list[dict[str, Any]]) -> None:
    """Adds the chat messages of one input item to ``messages``; ``thinking`` holds the thinking
    blocks of the reasoning items read since the last assistant message, which the next one takes."""
    param = f"input[{index}]"
    if not isinstance(item, dict):
        raise refuse(f"'{param}' must be an object.", "input")
    kind = item.get("type", "message")
    if kind == "message":
        given = item.get("role")
        role = _ROLES.get(given) if isinstance(given, str) else None
        if role is None:
            raise refuse(f"'{param}.role' must be user, assistant, system or developer.", "input")
        content = _content(item.get("content"), param)
        # Chat takes images in user turns only, and plain text elsewhere.
        messages.append({"role": role, "content": content if role == "user" else _flat(content)})
        if role == "assistant":
            _take_thinking(messages[-1], thinking)
        else:
            # Reasoning that no assistant item followed belongs to no turn.
            thinking.clear()
    elif kind == "function_call":
        call_id, name, arguments = item.get("call_id"), item.get("name"), item.get("arguments")
        if not isinstance(call_id, str) or not isinstance(name, str) or not isinstance(arguments, str):
            raise refuse(f"'{param}' needs string 'call_id', 'name' and 'arguments'.", "input")
        call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
        last = messages[-1] if messages else None
        # Parallel calls are consecutive items; chat puts them in one assistant message.
        if last is not None and last["role"] == "assistant" and "tool_calls" in last:
            last["tool_calls"].append(call)
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        _take_thinking(messages[-1], thinking)
    elif kind == "function_call_output":
        call_id, output = item.get("call_id"), item.get("output")
        if not isinstance(call_id, str):
            raise refuse(f"'{param}.call_id' must be a string.", "input")
        if not isinstance(output, str):
            output = _flat(_content(output, param))
        messages.append({"role": "tool", "tool_call_id": call_id, "content": output})
        thinking.clear()
    elif kind == "reasoning":
        block = _thinking(item, param)
        if block is not None:
            thinking.append(block)
    elif kind == "item_reference":
        raise refuse(f"'{param}': item references need stored items. {_STATELESS_HINT}.", "input")
    else:
        raise refuse(f"'{param}': input items of type {kind!r} are not supported.", "input")


def _take_thinking(message: dict[str, Any], thinking: list[dict[str, Any]]) -> None:
    if thinking:
        message.setdefault("thinking_blocks", []).extend(thinking)
        thinking.clear()


def _reasoning_effort(body: dict[str, Any], chat: dict[str, Any]) -> None:
    """``reasoning.effort`` as chat's ``reasoning_effort`` (the same values); ``summary`` is not
    forwarded (a reasoning item's summary is whatever thinking text the channel returns)."""
    optional_object(body, "reasoning")
    effort = (body.get("reasoning") or {}).get("effort")
    if effort is None:
        return
    if not isinstance(effort, str) or effort not in _EFFORTS:
        raise refuse(f"'reasoning.effort' must be one of {', '.join(sorted(_EFFORTS))}.", "reasoning")
    chat["reasoning_effort"] = effort


def _tools(body: dict[str, Any], limits: RelaySettings) -> list[dict[str, Any]]:
    optional_array(body, "tools", limits.max_tools)
    converted = []
    for index, tool in enumerate(body.get("tools") or ()):
        param = f"tools[{index}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise refuse(f"'{param}': only function tools are supported, not {kind!r}.", "tools")
        if not isinstance(tool.get("name"), str):
            raise refuse(f"'{param}.name' must be a string.", "tools")
        function: dict[str, Any] = {"name": tool["name"]}
        for key in ("description", "parameters", "strict"):
            if tool.get(key) is not None:
                function[key] = tool[key]
        converted.append({"type": "function", "function": function})
    return converted


def _tool_choice(choice: Any) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise refuse("'tool_choice' must be auto, none, required or a function by name.", "tool_choice")


def _response_format(text: Any) -> dict[str, Any] | None:
    if text is None:
        return None
    if not isinstance(text, dict):
        raise refuse("'text' must be an object.", "text")
    fmt = text.get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        schema = {key: fmt[key] for key in ("name", "schema", "strict", "description") if key in fmt}
        return {"type": "json_schema", "json_schema": schema}
    raise refuse("'text.format.type' must be text, json_object or json_schema.", "text")


def to_chat(body: dict[str, Any], limits: RelaySettings) -> dict[str, Any]:
    """The OpenAI chat body for the Responses request ``body``; raises a 400 naming the bad field."""
    model = require_model(body)
    _refuse_stateful(body)
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise refuse("'instructions' must be a string.", "instructions")
        messages.append({"role": "system", "content": instructions})
    given = body.get("input")
    if isinstance(given, str):
        messages.append({"role": "user", "content": given})
    elif isinstance(given, list) and given:
        if len(given) > limits.max_input_items:
            raise refuse(f"'input' has more than {limits.max_input_items} items.", "input")
        # Reasoning items with no assistant item after them have no turn to go back with: dropped.
        thinking: list[dict[str, Any]] = []
        for index, item in enumerate(given):
            _item(item, index, messages, thinking)
    else:
        raise refuse("'input' must be a string or a non-empty array of items.", "input")
    if not messages:
        raise refuse("'input' holds nothing to send.", "input")
    chat: dict[str, Any] = {"model": model, "messages": messages}
    max_output = optional_positive_int(body, "max_output_tokens", MAX_TOKENS)
    if max_output is not None:
        chat["max_tokens"] = max_output
    for name in ("temperature", "top_p"):
        optional_number(body, name)
        if body.get(name) is not None:
            chat[name] = body[name]
    if body.get("user") is not None:
        if not isinstance(body["user"], str):
            raise refuse("'user' must be a string.", "user")
        chat["user"] = body["user"]
    optional_object(body, "metadata")
    tools = _tools(body, limits)
    if tools:
        chat["tools"] = tools
        if body.get("parallel_tool_calls") is not None:
            chat["parallel_tool_calls"] = optional_bool(body, "parallel_tool_calls")
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    response_format = _response_format(body.get("text"))
    if response_format is not None:
        chat["response_format"] = response_format
    _reasoning_effort(body, chat)
    if optional_bool(body, "stream"):
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return extensions.mark(chat)


def usage_of(usage: ChatUsage | None) -> dict[str, Any]:
    usage = usage or ChatUsage()
    return {
        "input_tokens": usage.prompt,
        "input_tokens_details": {"cached_tokens": usage.cache_read, "cache_write_tokens": usage.cache_write},
        "output_tokens": usage.output,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning},
        "total_tokens": usage.prompt + usage.output,
    }


def reasoning_item(
    item_id: str, text: str, *, status: str, signature: str | None = None, redacted: str | None = None
) -> dict[str, Any]:
    """A ``reasoning`` output item for one thinking block: its text as the summary, and what lets it
    go back to a channel in a later request as its ``encrypted_content`` (the block's signature, or
    a redacted block's data after :data:`_REDACTED`)."""
    sealed = _REDACTED + redacted if redacted is not None else signature or None
    summary = [{"type": "summary_text", "text": text}] if text else []
    return {
        "id": item_id,
        "type": "reasoning",
        "summary": summary,
        "encrypted_content": sealed,
        "status": status,
    }


def reasoning_items(message: dict[str, Any], suffix: str) -> list[dict[str, Any]]:
    """The reasoning items of a chat answer's ``message``: one per thinking block, else one for its
    ``reasoning_content`` (a channel that signs nothing)."""
    found: list[dict[str, Any]] = []
    for block in items(message.get("thinking_blocks")):
        kind = block.get("type") if isinstance(block, dict) else None
        item_id = f"rs_{suffix}_{len(found)}"
        if kind == "thinking":
            signature = block.get("signature")
            text = str(block.get("thinking") or "")
            sealed = signature if isinstance(signature, str) else None
            found.append(reasoning_item(item_id, text, status="completed", signature=sealed))
        elif kind == "redacted_thinking":
            data = str(block.get("data") or "")
            found.append(reasoning_item(item_id, "", status="completed", redacted=data))
    reasoning = message.get("reasoning_content")
    if not found and isinstance(reasoning, str) and reasoning:
        found.append(reasoning_item(f"rs_{suffix}_0", reasoning, status="completed"))
    return found


def message_item(item_id: str, text: str, *, status: str) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": content}


def function_call_item(
    item_id: str, call_id: str, name: str, arguments: str, *, status: str
) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "function_call",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def response_object(
    shape: ResponseShape,
    *,
    status: str,
    output: list[dict[str, Any]],
    usage: ChatUsage | None,
    finish_reason: str | None = None,
) -> dict[str, Any]:
    """The Response object; ``usage`` None leaves it out (a response still in progress)."""
    incomplete = None
    if finish_reason == "length":
        status, incomplete = "incomplete", {"reason": "max_output_tokens"}
    elif finish_reason == "content_filter":
        status, incomplete = "incomplete", {"reason": "content_filter"}
    return {
        "id": shape.response_id,
        "object": "response",
        "created_at": shape.created_at,
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": incomplete,
        "instructions": shape.instructions,
        "max_output_tokens": shape.max_output_tokens,
        "model": shape.model,
        "output": output,
        "parallel_tool_calls": shape.parallel_tool_calls,
        "previous_response_id": None,
        "store": False,
        "temperature": shape.temperature,
        "text": {"format": shape.text_format or {"type": "text"}},
        "tool_choice": shape.tool_choice,
        "tools": shape.tools,
        "top_p": shape.top_p,
        "truncation": "disabled",
        "usage": usage_of(usage) if usage is not None or status != "in_progress" else None,
        "user": shape.user,
        "metadata": shape.metadata or {},
    }


def to_response(answer: bytes, shape: ResponseShape) -> bytes:
    """The Response object for the chat answer ``answer`` (its first choice)."""
    parsed = read_answer(answer)
    choices = parsed.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    message = obj(choice.get("message"))
    suffix = shape.response_id.removeprefix("resp_")
    output = reasoning_items(message, suffix)
    text = message.get("content")
    if isinstance(text, str) and text:
        output.append(message_item(f"msg_{suffix}", text, status="completed"))
    for index, call in enumerate(items(message.get("tool_calls"))):
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            arguments = function.get("arguments")
            output.append(
                function_call_item(
                    f"fc_{suffix}_{index}",
                    str(call.get("id") or ""),
                    str(function.get("name") or ""),
                    arguments if isinstance(arguments, str) else orjson.dumps(arguments or {}).decode(),
                    status="completed",
                )
            )
    reason = choice.get("finish_reason")
    return orjson.dumps(
        response_object(
            shape,
            status="completed",
            output=output,
            usage=chat_usage(parsed.get("usage")),
            finish_reason=reason if isinstance(reason, str) else None,
        )
    )
