"""The chat extensions a body converted from another inbound format may carry, and that body without
them for the channels that pass chat bodies through (OpenAI, Azure OpenAI).

The converting providers honour ``thinking``, ``cache_control`` (on a content part, a message or a
tool) and an assistant message's ``thinking_blocks`` (:mod:`.reasoning`); OpenAI's API refuses
parameters it does not know. A chat caller's body goes to OpenAI as the caller wrote it (the caller
chose its fields), but a body the relay built from ``/v1/messages`` or ``/v1/responses`` carries
them only because the caller's own format had them, so the relay marks such a body
(:func:`mark`) and the payload builders send OpenAI and Azure channels :func:`without_extensions`.
An unmarked body costs the payload builders nothing.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MARK", "mark", "without_extensions"]

# The member that marks a converted body carrying extensions; never sent upstream.
MARK = "relaygate_extensions"
_TOP = ("thinking", MARK)
_IN_MESSAGE = ("cache_control", "thinking_blocks")


def _carries(chat: dict[str, Any]) -> bool:
    if "thinking" in chat:
        return True
    for tool in chat.get("tools") or ():
        if isinstance(tool, dict) and "cache_control" in tool:
            return True
    for message in chat.get("messages") or ():
        if not isinstance(message, dict):
            continue
        if "cache_control" in message or "thinking_blocks" in message:
            return True
        content = message.get("content")
        if isinstance(content, list) and any(isinstance(p, dict) and "cache_control" in p for p in content):
            return True
    return False


def mark(chat: dict[str, Any]) -> dict[str, Any]:
    """``chat`` (converted from another format), marked when it carries an extension."""
    if _carries(chat):
        chat[MARK] = True
    return chat


def _plain_message(message: Any) -> Any:
    if not isinstance(message, dict):
        return message
    plain = {key: value for key, value in message.items() if key not in _IN_MESSAGE}
    content = plain.get("content")
    if isinstance(content, list):
        plain["content"] = [
            {k: v for k, v in part.items() if k != "cache_control"} if isinstance(part, dict) else part
            for part in content
        ]
    return plain


def without_extensions(body: dict[str, Any]) -> dict[str, Any]:
    """A copy of the marked ``body`` as OpenAI's API takes it: no marker, ``thinking``,
    ``thinking_blocks`` or ``cache_control`` anywhere (``body`` itself is left as it is)."""
    plain = {key: value for key, value in body.items() if key not in _TOP}
    messages = plain.get("messages")
    if isinstance(messages, list):
        plain["messages"] = [_plain_message(message) for message in messages]
    tools = plain.get("tools")
    if isinstance(tools, list):
        plain["tools"] = [
            {k: v for k, v in tool.items() if k != "cache_control"} if isinstance(tool, dict) else tool
            for tool in tools
        ]
    return plain
