"""CPU per streamed chunk of the inbound formats: OpenAI chat chunks rewritten into Anthropic Messages
events (``/v1/messages``) and Responses API events (``/v1/responses``), as the converting sink does
for every chunk the relay forwards. Reported by ``python -m bench --conversions`` next to the
provider decoders (:mod:`bench.conversions`), on the same recorded-shape stream: ``CHUNKS`` one-word
content chunks, the usage chunk and ``[DONE]``, fed one event per write as the pump forwards them.
The figure is the conversion's own cost; the pass-through scanner's row is the rest of the path.

The thinking rows (:func:`inbound_rows`) feed a thinking stream as a converting channel sends it:
``CHUNKS`` ``reasoning_content`` chunks, the ``thinking_blocks`` chunk that signs them, a one-word
answer, the usage chunk and ``[DONE]``; the figure is per thinking chunk.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import orjson

from services.relay.formats.anthropic_stream import MessagesStream
from services.relay.formats.responses import ResponseShape
from services.relay.formats.responses_stream import ResponsesStream
from services.relay.formats.stream_sink import StreamConverter

__all__ = ["INBOUND", "inbound_rows", "measure_inbound", "thinking_stream"]

INBOUND: dict[str, Callable[[], StreamConverter]] = {
    "openai -> anthropic messages (inbound)": lambda: MessagesStream("m"),
    "openai -> responses (inbound)": lambda: ResponsesStream(ResponseShape.of({"model": "m"}, "resp_1")),
}


def measure_inbound(
    new_converter: Callable[[], StreamConverter],
    events: list[bytes],
    *,
    chunks: int,
    streams: int,
    rounds: int,
) -> float:
    """Median CPU microseconds per content chunk over ``rounds`` measurements of ``streams`` streams."""
    figures = []
    for _ in range(rounds):
        started = time.process_time()
        for _ in range(streams):
            converter = new_converter()
            for data in events:
                converter.convert(data)
            converter.finish()
        figures.append((time.process_time() - started) / (streams * chunks) * 1e6)
    return sorted(figures)[len(figures) // 2]


def thinking_stream(chunks: int) -> list[bytes]:
    """A converting channel's chat stream of ``chunks`` thinking pieces, their signature and a
    one-word answer, one event per write."""
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}

    def chunk(delta: dict[str, object]) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": None}
        return b"data: " + orjson.dumps({**head, "choices": [choice]}) + b"\n\n"

    events = [chunk({"reasoning_content": f"step{i} "}) for i in range(chunks)]
    signed = {"type": "thinking", "thinking": "", "signature": "EqQBCkgIARABGAIiQ" * 8}
    events.append(chunk({"thinking_blocks": [signed]}))
    events.append(chunk({"content": "done"}))
    usage = {
        "prompt_tokens": 10,
        "completion_tokens": chunks + 1,
        "completion_tokens_details": {"reasoning_tokens": chunks},
    }
    events.append(b"data: " + orjson.dumps({**head, "choices": [], "usage": usage}) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


def inbound_rows(text_events: list[bytes], *, chunks: int, streams: int, rounds: int) -> list[str]:
    """The markdown rows of every inbound conversion: the text stream ``text_events``, then the
    thinking stream."""
    rows = []
    thinking = thinking_stream(chunks)
    for name, new_converter in INBOUND.items():
        figure = measure_inbound(new_converter, text_events, chunks=chunks, streams=streams, rounds=rounds)
        rows.append(f"| {name} | {figure:.2f} |")
    for name, new_converter in INBOUND.items():
        figure = measure_inbound(new_converter, thinking, chunks=chunks, streams=streams, rounds=rounds)
        rows.append(f"| {name.replace(' (inbound)', ' thinking (inbound)')} | {figure:.2f} |")
    return rows
