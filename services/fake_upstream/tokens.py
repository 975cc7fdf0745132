"""The fake upstream's token arithmetic: deterministic, documented, and relied on by gateway tests.

Prompt tokens:
    * chat: the number of whitespace-separated words across all message contents, plus 1 per
      message. String content counts its words; list-of-parts content counts the words of every
      ``{"type": "text", "text": ...}`` part; other parts (images, audio) and ``null`` content count 0.
      Names, tool definitions and other request fields are not counted.
    * legacy completions: the words of ``prompt`` (a string or a list of strings); a token-id array
      counts one token per id. No per-prompt overhead.
    * embeddings: the words of ``input`` (string or list of strings); token-id arrays count one per
      id. ``total_tokens`` equals ``prompt_tokens``.

Completion tokens:
    the number of generated words. The reply is ``tok0 tok1 ... tok{n-1} `` (every word followed by
    one space), where ``n`` is the configured chunk count capped by ``max_tokens`` /
    ``max_completion_tokens`` (the smaller when both are given). In a stream each content chunk
    carries exactly one word, so completion tokens == number of content chunks.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any


def count_content(content: Any) -> int:
    """Words in one chat message ``content`` (string, list of parts, or ``None``)."""
    if isinstance(content, str):
        return len(content.split())
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                text = part.get("text")
                if isinstance(text, str):
                    total += len(text.split())
        return total
    return 0


def count_chat_prompt(messages: list[Any]) -> int:
    """Prompt tokens of a chat request: words of every message content plus 1 per message."""
    total = len(messages)
    for message in messages:
        if isinstance(message, dict):
            total += count_content(message.get("content"))
    return total


def count_prompt_input(value: Any) -> int:
    """Prompt tokens of a completions ``prompt`` or embeddings ``input``.

    Strings count words, lists of strings sum their words, token-id arrays count their ids (also
    inside a list of arrays).
    """
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        total = 0
        for item in value:
            if isinstance(item, str):
                total += len(item.split())
            elif isinstance(item, list):
                total += len(item)
            elif isinstance(item, int):
                total += 1
        return total
    return 0


@lru_cache(maxsize=64)
def completion_words(count: int) -> tuple[str, ...]:
    """The words of a ``count``-word reply, each followed by one space (``"tok0 "``, ``"tok1 "``, ...)."""
    return tuple(f"tok{index} " for index in range(count))


@lru_cache(maxsize=64)
def completion_text(count: int) -> str:
    """The whole ``count``-word reply, as returned by non-streaming requests."""
    return "".join(completion_words(count))
