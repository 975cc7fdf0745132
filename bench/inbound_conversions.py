"""CPU per streamed chunk of the inbound formats: OpenAI chat chunks rewritten into Anthropic Messages
events (``/v1/messages``) and Responses API events (``/v1/responses``), as the converting sink does
for every chunk the relay forwards. Reported by ``python -m bench --conversions`` next to the
provider decoders (:mod:`bench.conversions`), on the same recorded-shape stream: ``CHUNKS`` one-word
content chunks, the usage chunk and ``[DONE]``, fed one event per write as the pump forwards them.
The figure is the conversion's own cost; the pass-through scanner's row is the rest of the path.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from services.relay.formats.anthropic_stream import MessagesStream
from services.relay.formats.responses import ResponseShape
from services.relay.formats.responses_stream import ResponsesStream
from services.relay.formats.stream_sink import StreamConverter

__all__ = ["INBOUND", "measure_inbound"]

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
