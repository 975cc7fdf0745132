"""Anthropic Messages (``POST {base}/messages``, ``x-api-key``, ``anthropic-version``).

Request (https://docs.anthropic.com/en/api/messages): system and developer messages become
``system``; user and assistant messages become content blocks (text, images by URL or base64, the
assistant's ``tool_use``); tool messages become ``tool_result`` blocks of a user turn; consecutive
turns of one role are merged. ``tools`` / ``tool_choice`` (auto, none, required -> any, a named
function -> tool; ``parallel_tool_calls: false`` -> ``disable_parallel_tool_use``), ``stop`` ->
``stop_sequences``, ``temperature`` (capped at Anthropic's 1.0), ``top_p``, ``user`` ->
``metadata.user_id``. ``max_tokens`` is required there: the caller's cap, else the held one.

Reasoning, caching and documents (:mod:`.reasoning` reads the chat extensions): ``thinking`` as
the caller gave it, else a budget from ``reasoning_effort`` (kept under the held cap;
https://docs.anthropic.com/en/docs/build-with-claude/extended-thinking); an assistant message's
``thinking_blocks`` open its turn, signed as they came (Anthropic requires them when thinking and
tool use continue a turn); ``cache_control`` on a part, a message (its last block) or a tool becomes
the block's or tool's breakpoint (https://docs.anthropic.com/en/docs/build-with-claude/prompt-caching);
a PDF ``file`` part becomes a base64 ``document`` block
(https://docs.anthropic.com/en/docs/build-with-claude/pdf-support). A ``temperature`` set with
thinking is sent as set: Anthropic refuses any but 1, and its 400 reaches the caller.

Answer and stream (https://docs.anthropic.com/en/docs/build-with-claude/streaming): text and
``tool_use`` blocks become the message's content and ``tool_calls`` (streamed ``input_json_delta``
pieces become argument deltas); ``thinking`` blocks become ``reasoning_content`` (their text
joined) and ``thinking_blocks`` (with signatures; ``redacted_thinking`` blocks whole); in a stream
each ``thinking_delta`` is a ``reasoning_content`` delta, and a ``signature_delta`` (the end of a
thinking block) a ``thinking_blocks`` delta of one block with empty text and the signature.
Usage: ``input_tokens`` plus ``cache_read_input_tokens`` are the prompt (the read part cached),
``cache_creation_input_tokens`` the cache writes, ``output_tokens`` the completion (thinking
included, counted apart when the answer reports it).
"""

from __future__ import annotations

from typing import Any

import orjson

from services.common.errors import UpstreamError
from services.common.pb.relaygate.common.v1.types_pb2 import Usage
from services.relay.providers.base import (
    DEFAULT_MAX_TOKENS,
    DONE,
    ChunkWriter,
    Provider,
    completion,
    count,
    error_body,
    invalid,
    loads_object,
    tool_call_delta,
)
from services.relay.providers.content import (
    ANTHROPIC_STOP,
    arguments_of,
    chosen_function,
    parse_data_url,
    text_of,
)
from services.relay.providers.events import EventReader
from services.relay.providers.reasoning import (
    anthropic_thinking,
    cache_control_of,
    file_data,
    thinking_blocks_of,
)

__all__ = ["ANTHROPIC", "COUNT_TOKENS_PATH", "AnthropicProvider"]

API_VERSION = "2023-06-01"
# Anthropic's token counting (https://docs.anthropic.com/en/api/messages-count-tokens), which
# /v1/messages/count_tokens forwards to: the one path besides chat an Anthropic channel is sent.
COUNT_TOKENS_PATH = b"/messages/count_tokens"
# OpenAI accepts temperatures up to 2, Anthropic up to 1.
_MAX_TEMPERATURE = 1.0


def _blocks(content: Any) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise invalid("A message's content must be a string or a list of parts.", "messages")
    blocks: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        block: dict[str, Any]
        if kind == "text":
            if not part.get("text"):
                continue
            block = {"type": "text", "text": part["text"]}
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise invalid("An image_url part needs a url.", "messages")
            data = parse_data_url(url)
            source = (
                {"type": "url", "url": url}
                if data is None
                else {"type": "base64", "media_type": data[0], "data": data[1]}
            )
            block = {"type": "image", "source": source}
        elif kind == "file":
            block = _document(part)
        else:
            raise invalid(
                f"Content parts of type {kind!r} cannot be sent to an Anthropic channel.", "messages"
            )
        control = cache_control_of(part)
        if control is not None:
            block["cache_control"] = control
        blocks.append(block)
    return blocks


def _document(part: dict[str, Any]) -> dict[str, Any]:
    """A ``document`` block (https://docs.anthropic.com/en/docs/build-with-claude/pdf-support) for a
    PDF file part; an image sent as a file is an image block."""
    media_type, data, name = file_data(part)
    source = {"type": "base64", "media_type": media_type, "data": data}
    if media_type.startswith("image/"):
        return {"type": "image", "source": source}
    if media_type != "application/pdf":
        raise invalid(f"Files of type {media_type!r} cannot be sent to an Anthropic channel.", "messages")
    block: dict[str, Any] = {"type": "document", "source": source}
    if name is not None:
        block["title"] = name
    return block


def _mark_last(blocks: list[dict[str, Any]], message: dict[str, Any]) -> None:
    """A message's ``cache_control`` is a breakpoint on its last block."""
    control = cache_control_of(message)
    if control is not None and blocks:
        blocks[-1]["cache_control"] = control


def _tool_use(calls: Any) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for call in calls if isinstance(calls, list) else ():
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            continue
        found.append(
            {
                "type": "tool_use",
                "id": call.get("id") or "",
                "name": function.get("name") or "",
                "input": arguments_of(call),
            }
        )
    return found


def _messages(body: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(system blocks, turns) of an OpenAI chat body."""
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    for message in body.get("messages") or ():
        role = message.get("role") if isinstance(message, dict) else None
        if role in ("system", "developer"):
            blocks = _blocks(message.get("content"))
            _mark_last(blocks, message)
            system.extend(blocks)
            continue
        if role == "user":
            blocks, as_role = _blocks(message.get("content")), "user"
        elif role == "assistant":
            blocks = (
                thinking_blocks_of(message)
                + _blocks(message.get("content"))
                + _tool_use(message.get("tool_calls"))
            )
            as_role = "assistant"
        elif role == "tool":
            result = {
                "type": "tool_result",
                "tool_use_id": message.get("tool_call_id") or "",
                "content": text_of(message.get("content")),
            }
            blocks, as_role = [result], "user"
        else:
            raise invalid(f"Messages of role {role!r} cannot be sent to an Anthropic channel.", "messages")
        _mark_last(blocks, message)
        if turns and turns[-1]["role"] == as_role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": as_role, "content": blocks})
    return system, turns


def _tools(body: dict[str, Any], request: dict[str, Any]) -> None:
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        declared = []
        for tool in tools:
            function = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise invalid("Each tool needs a function with a name.", "tools")
            entry: dict[str, Any] = {
                "name": function["name"],
                "input_schema": function.get("parameters") or {"type": "object", "properties": {}},
            }
            if function.get("description"):
                entry["description"] = function["description"]
            control = cache_control_of(tool)
            if control is not None:
                entry["cache_control"] = control
            declared.append(entry)
        request["tools"] = declared
    choice = body.get("tool_choice")
    picked: dict[str, Any] | None = None
    if choice == "auto":
        picked = {"type": "auto"}
    elif choice == "none":
        picked = {"type": "none"}
    elif choice == "required":
        picked = {"type": "any"}
    elif isinstance(choice, dict):
        picked = {"type": "tool", "name": chosen_function(choice)}
    if body.get("parallel_tool_calls") is False and "tools" in request:
        picked = picked or {"type": "auto"}
        if picked["type"] != "none":
            picked["disable_parallel_tool_use"] = True
    if picked is not None and "tools" in request:
        request["tool_choice"] = picked


def _usage(report: Any) -> Usage | None:
    if not isinstance(report, dict):
        return None
    read = count(report.get("cache_read_input_tokens"))
    output = count(report.get("output_tokens"))
    details = report.get("output_tokens_details")
    thinking = count(details.get("thinking_tokens")) if isinstance(details, dict) else 0
    return Usage(
        prompt_tokens=count(report.get("input_tokens")) + read,
        cached_prompt_tokens=read,
        cache_write_tokens=count(report.get("cache_creation_input_tokens")),
        completion_tokens=output,
        reasoning_tokens=min(thinking, output),
    )


class AnthropicProvider(Provider):
    kind = "anthropic"

    def auth_headers(self, api_key: str) -> dict[str, str]:
        headers = {"anthropic-version": API_VERSION}
        if api_key:
            headers["x-api-key"] = api_key
        return headers

    def target(self, prefix: bytes, path: bytes, model: str, *, stream: bool, api_version: str) -> bytes:
        return prefix + (COUNT_TOKENS_PATH if path == COUNT_TOKENS_PATH else b"/messages")

    def request(self, body: dict[str, Any], model: str, *, stream: bool, max_output_tokens: int) -> bytes:
        if isinstance(body.get("n"), int) and body["n"] > 1:
            raise invalid("Anthropic channels produce one choice per request (n must be 1).", "n")
        system, turns = _messages(body)
        cap = (
            body.get("max_completion_tokens")
            or body.get("max_tokens")
            or max_output_tokens
            or DEFAULT_MAX_TOKENS
        )
        request: dict[str, Any] = {"model": model, "max_tokens": cap, "messages": turns}
        if system:
            request["system"] = system
        thinking = anthropic_thinking(body, cap)
        if thinking is not None:
            request["thinking"] = thinking
        temperature = body.get("temperature")
        if isinstance(temperature, int | float) and not isinstance(temperature, bool):
            request["temperature"] = min(float(temperature), _MAX_TEMPERATURE)
        if isinstance(body.get("top_p"), int | float):
            request["top_p"] = body["top_p"]
        stop = body.get("stop")
        if isinstance(stop, str):
            request["stop_sequences"] = [stop]
        elif isinstance(stop, list) and stop:
            request["stop_sequences"] = stop
        if isinstance(body.get("user"), str):
            request["metadata"] = {"user_id": body["user"]}
        _tools(body, request)
        if stream:
            request["stream"] = True
        return orjson.dumps(request)

    def answer(self, body: bytes, model: str) -> tuple[bytes, Usage | None]:
        message = loads_object(body)
        if message is None:
            raise UpstreamError("The Anthropic channel's answer is not a JSON object.")
        text: list[str] = []
        calls: list[dict[str, Any]] = []
        thoughts: list[dict[str, Any]] = []
        for block in message.get("content") or ():
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":
                text.append(str(block.get("text") or ""))
            elif kind == "thinking":
                thoughts.append(
                    {
                        "type": "thinking",
                        "thinking": str(block.get("thinking") or ""),
                        "signature": str(block.get("signature") or ""),
                    }
                )
            elif kind == "redacted_thinking":
                thoughts.append({"type": "redacted_thinking", "data": str(block.get("data") or "")})
            elif kind == "tool_use":
                calls.append(
                    {
                        "id": block.get("id") or "",
                        "type": "function",
                        "function": {
                            "name": block.get("name") or "",
                            "arguments": orjson.dumps(block.get("input") or {}).decode(),
                        },
                    }
                )
        reply: dict[str, Any] = {"role": "assistant", "content": "".join(text) if text or not calls else None}
        if calls:
            reply["tool_calls"] = calls
        if thoughts:
            reply["reasoning_content"] = "".join(b.get("thinking", "") for b in thoughts)
            reply["thinking_blocks"] = thoughts
        finish = ANTHROPIC_STOP.get(str(message.get("stop_reason")), "stop")
        choice = {"index": 0, "message": reply, "logprobs": None, "finish_reason": finish}
        usage = _usage(message.get("usage"))
        return completion(
            str(message.get("id") or ""), str(message.get("model") or model), [choice], usage
        ), usage

    def decoder(self, model: str, *, include_usage: bool) -> AnthropicStream:
        return AnthropicStream(model, include_usage=include_usage)

    def error(self, status: int, body: bytes) -> tuple[int, bytes]:
        parsed = loads_object(body)
        error = parsed.get("error") if parsed is not None else None
        if not isinstance(error, dict):
            return status, error_body(f"The Anthropic channel answered {status}.", "upstream_error")
        kind = str(error.get("type") or "api_error")
        return status, error_body(str(error.get("message") or ""), kind)


class AnthropicStream:
    """Anthropic's stream events -> OpenAI chunks; see the module docstring."""

    def __init__(self, model: str, *, include_usage: bool) -> None:
        self._reader = EventReader()
        self._model = model
        self._include_usage = include_usage
        self._writer: ChunkWriter | None = None
        # Anthropic's content block index -> the OpenAI tool call index.
        self._tools: dict[int, int] = {}
        self._report: dict[str, Any] = {}
        self.usage: Usage | None = None
        self.done = False
        self.events = 0

    def feed(self, data: bytes) -> bytes:
        out: list[bytes] = []
        for payload in self._reader.feed(data):
            try:
                event = orjson.loads(payload)
            except orjson.JSONDecodeError:
                continue
            if isinstance(event, dict):
                self._event(event, out)
        return b"".join(out)

    def flush(self) -> bytes:
        return b""

    def _event(self, event: dict[str, Any], out: list[bytes]) -> None:
        kind = event.get("type")
        if kind == "content_block_delta":
            delta = event.get("delta") or {}
            writer = self._writer
            if writer is None:
                return
            if delta.get("type") == "text_delta":
                self.events += 1
                out.append(writer.delta({"content": delta.get("text") or ""}))
            elif delta.get("type") == "input_json_delta":
                tool = self._tools.get(event.get("index", -1))
                if tool is not None:
                    self.events += 1
                    out.append(
                        writer.delta(tool_call_delta(tool, None, None, delta.get("partial_json") or ""))
                    )
            elif delta.get("type") == "thinking_delta":
                self.events += 1
                out.append(writer.delta({"reasoning_content": delta.get("thinking") or ""}))
            elif delta.get("type") == "signature_delta":
                # Sent just before the thinking block ends: the caller needs it to send the block back.
                block = {"type": "thinking", "thinking": "", "signature": delta.get("signature") or ""}
                out.append(writer.delta({"thinking_blocks": [block]}))
        elif kind == "content_block_start":
            block = event.get("content_block") or {}
            writer = self._writer
            if writer is None:
                return
            started = block.get("type")
            if started == "tool_use":
                tool = self._tools[event.get("index", -1)] = len(self._tools)
                out.append(
                    writer.delta(tool_call_delta(tool, block.get("id") or "", block.get("name") or "", ""))
                )
            elif started == "redacted_thinking":
                self.events += 1
                redacted = {"type": "redacted_thinking", "data": block.get("data") or ""}
                out.append(writer.delta({"thinking_blocks": [redacted]}))
            elif started == "thinking" and block.get("thinking"):
                self.events += 1
                out.append(writer.delta({"reasoning_content": block["thinking"]}))
        elif kind == "message_start":
            message = event.get("message") or {}
            self._writer = ChunkWriter(str(message.get("id") or ""), str(message.get("model") or self._model))
            report = message.get("usage")
            if isinstance(report, dict):
                self._report.update(report)
            out.append(self._writer.delta({"role": "assistant", "content": ""}))
        elif kind == "message_delta":
            report = event.get("usage")
            if isinstance(report, dict):
                # Counts in message_delta are cumulative and win over message_start's.
                self._report.update({k: v for k, v in report.items() if v is not None})
                self.usage = _usage(self._report)
            reason = (event.get("delta") or {}).get("stop_reason")
            if reason and self._writer is not None:
                out.append(self._writer.delta({}, finish=ANTHROPIC_STOP.get(reason, "stop")))
        elif kind == "message_stop":
            if self._include_usage and self.usage is not None and self._writer is not None:
                out.append(self._writer.usage(self.usage))
            out.append(DONE)
            self.done = True
        elif kind == "error":
            error = event.get("error") or {}
            out.append(
                b"data: "
                + error_body(str(error.get("message") or ""), str(error.get("type") or "api_error"))
                + b"\n\n"
            )


ANTHROPIC = AnthropicProvider()
