"""``python -m bench --conversions``: CPU per streamed chunk of each provider conversion.

No services are started: each stream is a recorded-shape stream of ``CHUNKS`` content chunks (one
word each, as providers send them) fed to the relay's decoder one network read per event, the way
the pump sees them. ``openai`` is the pass-through scanner (:class:`~services.relay.stream.sse.
StreamScanner`, usage chunk stripped), the others the provider decoders that rewrite every chunk into
OpenAI's; the thinking streams are ``CHUNKS`` thinking deltas (Anthropic, then the block's signature)
or thought parts (Gemini) before a one-word answer, each becoming a ``reasoning_content`` delta. The
figure is process CPU time divided by the ``CHUNKS`` content chunks of a stream.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import orjson

from bench.inbound_conversions import inbound_rows
from services.relay.providers.anthropic import ANTHROPIC
from services.relay.providers.base import StreamDecoder
from services.relay.providers.gemini import GEMINI
from services.relay.stream.sse import StreamScanner

__all__ = ["measure", "run"]

CHUNKS = 200
# Streams decoded per measurement, and measurements per conversion (the median is reported).
STREAMS = 200
ROUNDS = 5


def _openai_stream() -> list[bytes]:
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    events = [
        b"data: "
        + orjson.dumps(
            {
                **head,
                "choices": [{"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": None}],
                "usage": None,
            }
        )
        + b"\n\n"
        for i in range(CHUNKS)
    ]
    usage = {"prompt_tokens": 10, "completion_tokens": CHUNKS, "total_tokens": 10 + CHUNKS}
    events.append(b"data: " + orjson.dumps({**head, "choices": [], "usage": usage}) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


def _anthropic_event(kind: str, payload: dict[str, object]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **payload}) + b"\n\n"


def _anthropic_stream() -> list[bytes]:
    event = _anthropic_event
    message = {
        "id": "msg_1",
        "model": "m",
        "role": "assistant",
        "content": [],
        "usage": {"input_tokens": 10, "output_tokens": 1},
    }
    events = [event("message_start", {"message": message})]
    events.append(event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}))
    events += [
        event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": f"tok{i} "}})
        for i in range(CHUNKS)
    ]
    events.append(event("content_block_stop", {"index": 0}))
    events.append(
        event("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": CHUNKS}})
    )
    events.append(event("message_stop", {}))
    return events


def _anthropic_thinking_stream() -> list[bytes]:
    """``CHUNKS`` thinking deltas, the block's signature, then a one-word answer."""
    events = _anthropic_stream()
    head, tail = events[:1], events[1:]
    thinking = [
        _anthropic_event(
            "content_block_start",
            {"index": 0, "content_block": {"type": "thinking", "thinking": "", "signature": ""}},
        )
    ]
    thinking += [
        _anthropic_event(
            "content_block_delta", {"index": 0, "delta": {"type": "thinking_delta", "thinking": f"step{i} "}}
        )
        for i in range(CHUNKS)
    ]
    thinking.append(
        _anthropic_event(
            "content_block_delta",
            {"index": 0, "delta": {"type": "signature_delta", "signature": "EqQBCkgIARABGAIiQ" * 8}},
        )
    )
    thinking.append(_anthropic_event("content_block_stop", {"index": 0}))
    answer = [
        _anthropic_event("content_block_start", {"index": 1, "content_block": {"type": "text", "text": ""}}),
        _anthropic_event(
            "content_block_delta", {"index": 1, "delta": {"type": "text_delta", "text": "done"}}
        ),
        _anthropic_event("content_block_stop", {"index": 1}),
    ]
    return head + thinking + answer + tail[-2:]


def _gemini_thinking_stream() -> list[bytes]:
    """``CHUNKS`` thought parts, then a one-word answer with the finish reason."""
    events = []
    for i in range(CHUNKS + 1):
        part: dict[str, object] = {"text": f"step{i} ", "thought": True} if i < CHUNKS else {"text": "done"}
        candidate: dict[str, object] = {"content": {"parts": [part], "role": "model"}, "index": 0}
        if i == CHUNKS:
            candidate["finishReason"] = "STOP"
        usage = {"promptTokenCount": 10, "candidatesTokenCount": 1, "thoughtsTokenCount": i + 1}
        payload = {"candidates": [candidate], "usageMetadata": usage, "modelVersion": "m", "responseId": "r"}
        events.append(b"data: " + orjson.dumps(payload) + b"\r\n\r\n")
    return events


def _gemini_stream() -> list[bytes]:
    events = []
    for i in range(CHUNKS):
        candidate: dict[str, object] = {
            "content": {"parts": [{"text": f"tok{i} "}], "role": "model"},
            "index": 0,
        }
        if i == CHUNKS - 1:
            candidate["finishReason"] = "STOP"
        usage = {"promptTokenCount": 10, "candidatesTokenCount": i + 1, "totalTokenCount": 11 + i}
        payload = {"candidates": [candidate], "usageMetadata": usage, "modelVersion": "m", "responseId": "r"}
        events.append(b"data: " + orjson.dumps(payload) + b"\r\n\r\n")
    return events


CONVERSIONS: dict[str, tuple[Callable[[], StreamDecoder], Callable[[], list[bytes]]]] = {
    "openai (pass-through)": (lambda: StreamScanner(strip_usage_chunk=True), _openai_stream),
    "anthropic -> openai": (lambda: ANTHROPIC.decoder("m", include_usage=False), _anthropic_stream),
    "gemini -> openai": (lambda: GEMINI.decoder("m", include_usage=False), _gemini_stream),
    "anthropic thinking -> openai": (
        lambda: ANTHROPIC.decoder("m", include_usage=False),
        _anthropic_thinking_stream,
    ),
    "gemini thoughts -> openai": (lambda: GEMINI.decoder("m", include_usage=False), _gemini_thinking_stream),
}


def measure(new_decoder: Callable[[], StreamDecoder], events: list[bytes]) -> float:
    """Median CPU microseconds per content chunk over ``ROUNDS`` measurements of ``STREAMS`` streams."""
    figures = []
    for _ in range(ROUNDS):
        started = time.process_time()
        for _ in range(STREAMS):
            decoder = new_decoder()
            for data in events:
                decoder.feed(data)
            decoder.flush()
            assert decoder.done and decoder.usage is not None
        figures.append((time.process_time() - started) / (STREAMS * CHUNKS) * 1e6)
    return sorted(figures)[len(figures) // 2]


def run() -> str:
    """The markdown table of every conversion's CPU per chunk."""
    lines = ["| conversion | CPU µs / chunk |", "|---|---:|"]
    for name, (new_decoder, stream) in CONVERSIONS.items():
        lines.append(f"| {name} | {measure(new_decoder, stream()):.2f} |")
    lines += inbound_rows(_openai_stream(), chunks=CHUNKS, streams=STREAMS, rounds=ROUNDS)
    return "\n".join(lines)
