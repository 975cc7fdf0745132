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
    carries exactly one word, so completion tokens == number of content chunks, unless a chat
    reply ends with a tool call (adding :func:`tool_call_tokens`) or ``reasoning_tokens`` are set
    (added to ``completion_tokens`` and reported in ``completion_tokens_details``; cached prompt
    tokens stay inside ``prompt_tokens``, reported in ``prompt_tokens_details``).

Anthropic and Gemini (see :func:`count_anthropic_prompt`, :func:`count_gemini_prompt`):
    the same words-plus-one-per-message rule over their own request shapes, the system prompt
    adding its words only. A reply is the same ``tok0 tok1 ...`` words, capped by ``max_tokens`` /
    ``generationConfig.maxOutputTokens``; a tool call after them adds :func:`tool_call_tokens`
    (its arguments come from :func:`tool_arguments`), and ``reasoning_tokens`` are added to
    Anthropic's ``output_tokens`` (thinking is billed as output) but reported apart by Gemini
    (``thoughtsTokenCount``, outside ``candidatesTokenCount``). Cache reads and writes are carved out
    of the prompt by :func:`split_prompt`.
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


def count_system(system: Any) -> int:
    """Words of a system prompt: Anthropic's ``system`` (string or text blocks) or Gemini's
    ``systemInstruction`` (``{"parts": [...]}``). No per-prompt overhead."""
    if isinstance(system, dict):
        return count_parts(system.get("parts"))
    return count_content(system)


def count_anthropic_prompt(system: Any, messages: list[Any]) -> int:
    """Input tokens of an Anthropic Messages request: system words, plus every message's text
    blocks (and the text of ``tool_result`` blocks), plus 1 per message."""
    total = count_system(system) + len(messages)
    for message in messages:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        total += count_content(content)
        if isinstance(content, list):
            for block in content:
                if isinstance(block, dict) and block.get("type") == "tool_result":
                    total += count_content(block.get("content"))
    return total


def count_parts(parts: Any) -> int:
    """Words of the ``text`` parts of one Gemini ``content``."""
    total = 0
    if isinstance(parts, list):
        for part in parts:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                total += len(part["text"].split())
    return total


def count_gemini_prompt(system_instruction: Any, contents: list[Any]) -> int:
    """Prompt tokens of a Gemini request: system instruction words, plus the words of every
    content's text parts, plus 1 per content."""
    total = count_system(system_instruction) + len(contents)
    for content in contents:
        if isinstance(content, dict):
            total += count_parts(content.get("parts"))
    return total


def tool_arguments(schema: Any) -> dict[str, Any]:
    """The arguments of a fake tool call, derived from the tool's JSON-schema ``properties`` in
    order: the ``i``-th property gets ``"tok{i}"`` when a string (or untyped), ``i`` when an integer
    or number, ``true`` when a boolean, ``[]`` / ``{}`` when an array / object."""
    properties = schema.get("properties") if isinstance(schema, dict) else None
    if not isinstance(properties, dict):
        return {}
    arguments: dict[str, Any] = {}
    for index, (name, spec) in enumerate(properties.items()):
        kind = spec.get("type") if isinstance(spec, dict) else None
        if isinstance(kind, str):
            kind = kind.lower()  # Gemini's OpenAPI schemas spell types in capitals
        arguments[name] = _ARGUMENT_VALUES.get(kind, lambda i: f"tok{i}")(index)
    return arguments


_ARGUMENT_VALUES: dict[Any, Any] = {
    "integer": lambda index: index,
    "number": lambda index: index,
    "boolean": lambda _index: True,
    "array": lambda _index: [],
    "object": lambda _index: {},
}


def tool_call_tokens(arguments: dict[str, Any]) -> int:
    """Output tokens of one tool call: 1 for the name plus 1 per argument."""
    return 1 + len(arguments)


def split_prompt(prompt_tokens: int, cached: int, cache_write: int) -> tuple[int, int, int]:
    """``prompt_tokens`` split into (neither read from nor written to the cache, read, written):
    the configured ``cached`` and ``cache_write`` counts capped by what the prompt has left."""
    read = min(cached, prompt_tokens)
    written = min(cache_write, prompt_tokens - read)
    return prompt_tokens - read - written, read, written
