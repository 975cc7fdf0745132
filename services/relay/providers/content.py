"""Pieces of the OpenAI chat format that every conversion reads the same way: data URLs, text of a
message's content, tool-call arguments, and the stop-reason tables between OpenAI and each provider.

Shared by the outbound conversions (a channel's provider format) and the inbound ones (a caller's
format): one table per direction, kept here so the two never drift apart.
"""

from __future__ import annotations

import binascii
from typing import Any

import orjson

from services.common.errors import InvalidRequest

__all__ = [
    "ANTHROPIC_STOP",
    "GEMINI_FINISH",
    "OPENAI_TO_ANTHROPIC_STOP",
    "arguments_of",
    "chosen_function",
    "parse_data_url",
    "text_of",
]

# Anthropic's stop_reason -> OpenAI's finish_reason.
ANTHROPIC_STOP: dict[str, str] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
# OpenAI's finish_reason -> Anthropic's stop_reason (for callers speaking Anthropic's format).
OPENAI_TO_ANTHROPIC_STOP: dict[str, str] = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
# Gemini's finishReason -> OpenAI's finish_reason; anything not listed is "stop".
GEMINI_FINISH: dict[str, str] = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
}


def parse_data_url(url: str) -> tuple[str, str] | None:
    """``(media type, base64 data)`` of a ``data:<type>;base64,<data>`` URL; None for any other URL.

    Raises :class:`InvalidRequest` for a data URL that is not base64 (providers take no other)."""
    if not url.startswith("data:"):
        return None
    header, comma, data = url[5:].partition(",")
    media_type, _, encoding = header.partition(";")
    if not comma or encoding != "base64" or not media_type:
        raise InvalidRequest(
            "A data URL (an image or file part) must be data:<media type>;base64,<data>.", param="messages"
        )
    try:
        binascii.a2b_base64(data[:64].encode())
    except binascii.Error:
        raise InvalidRequest(
            "A data URL (an image or file part) carries invalid base64.", param="messages"
        ) from None
    return media_type, data


def text_of(content: Any) -> str:
    """The text of a message ``content``: a string, or the text parts of a list joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
        )
    return ""


def chosen_function(choice: dict[str, Any]) -> str:
    """The function an OpenAI ``tool_choice`` object names (``{"type": "function", "function": {...}}``)."""
    function = choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise InvalidRequest("tool_choice must name a function.", param="tool_choice")
    return name


def arguments_of(call: Any) -> dict[str, Any]:
    """The arguments object of an OpenAI ``tool_calls`` entry (sent as a JSON text)."""
    function = call.get("function") if isinstance(call, dict) else None
    raw = function.get("arguments") if isinstance(function, dict) else None
    if raw is None or raw == "":
        return {}
    try:
        parsed = orjson.loads(raw) if isinstance(raw, str) else raw
    except orjson.JSONDecodeError:
        raise InvalidRequest("A tool call's arguments are not valid JSON.", param="messages") from None
    if not isinstance(parsed, dict):
        raise InvalidRequest("A tool call's arguments must be a JSON object.", param="messages")
    return parsed
