"""What a provider-format reply says, decided once and rendered by each dialect.

The Anthropic and Gemini handlers turn their requests into the same few facts (a word cap, the
tools offered, whether a call is required) and get back a :class:`Plan`: the words to send, whether
the cap cut them short, and the tool call that follows them, if any. Token rules are in
:mod:`.tokens`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from . import tokens
from .behaviour import Behaviour


@dataclass(frozen=True, slots=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]

    @property
    def tokens(self) -> int:
        return tokens.tool_call_tokens(self.arguments)

    @property
    def pieces(self) -> list[str]:
        """The arguments as JSON text split after each member, as streams send them:
        ``{"a": 1``, ``, "b": 2``, ``}`` (``{}`` whole when there are none)."""
        if not self.arguments:
            return ["{}"]
        pieces = []
        for position, (name, value) in enumerate(self.arguments.items()):
            lead = "{" if position == 0 else ", "
            pieces.append(lead + orjson.dumps(name).decode() + ": " + orjson.dumps(value).decode())
        pieces.append("}")
        return pieces

    @property
    def json(self) -> str:
        """The arguments as one JSON text (OpenAI's ``function.arguments``)."""
        return "".join(self.pieces)


@dataclass(frozen=True, slots=True)
class Plan:
    words: tuple[str, ...]
    capped: bool
    """The word cap cut the reply short (no tool call then: the model ran out of tokens first)."""
    tool: ToolCall | None

    @property
    def text(self) -> str:
        return "".join(self.words)

    @property
    def visible_tokens(self) -> int:
        """Output tokens of the words and the tool call (reasoning tokens not included)."""
        return len(self.words) + (self.tool.tokens if self.tool is not None else 0)


def plan(
    behaviour: Behaviour,
    cap: int | None,
    tools: Sequence[tuple[str, Any]],
    *,
    chosen: str | None = None,
    required: bool = False,
) -> Plan:
    """The reply to a request offering ``tools`` (name, JSON schema) with a word ``cap``.

    A tool is called when some are offered and either ``tool_call`` is on or the request
    ``required`` a call; ``chosen`` names the tool the request forced (it must be among ``tools``),
    else the first is called.
    """
    count = behaviour.chunks if cap is None else min(cap, behaviour.chunks)
    capped = count < behaviour.chunks
    call: ToolCall | None = None
    if tools and not capped and (behaviour.tool_call or required or chosen is not None):
        schemas = dict(tools)
        name = chosen if chosen is not None else tools[0][0]
        call = ToolCall(name, tokens.tool_arguments(schemas.get(name)))
    return Plan(tokens.completion_words(count), capped, call)
