"""The SSE scanner: forwarded bytes are the upstream's own, usage is read on the way."""

from __future__ import annotations

import orjson
import pytest

from services.fake_upstream import payloads
from services.relay.stream.sse import StreamScanner


def stream(*, usage_chunk: bool = True, usage_null: bool = True, every: bool = False) -> list[bytes]:
    events, _ = payloads.stream_events(
        chat=True,
        reply_id="chatcmpl-1",
        created=1,
        model="m",
        words=["a", "b", "c"],
        finish_reason="stop",
        prompt_tokens=7,
        usage_chunk=usage_chunk,
        usage_null=usage_null,
        usage_every_chunk=every,
    )
    return events


def feed_in_pieces(scanner: StreamScanner, data: bytes, size: int) -> bytes:
    out = b"".join(scanner.feed(data[i : i + size]) for i in range(0, len(data), size))
    return out + scanner.flush()


@pytest.mark.parametrize("size", [1, 7, 64, 100_000])
def test_bytes_pass_unchanged_however_they_are_split(size: int) -> None:
    data = b"".join(stream())
    scanner = StreamScanner(strip_usage_chunk=False)
    assert feed_in_pieces(scanner, data, size) == data
    assert scanner.done
    assert scanner.usage is not None
    assert (scanner.usage.prompt_tokens, scanner.usage.completion_tokens) == (7, 3)


@pytest.mark.parametrize("size", [1, 13, 100_000])
def test_the_usage_chunk_asked_for_on_the_callers_behalf_is_removed(size: int) -> None:
    events = stream()
    usage_event = events[-2]
    assert b'"choices":[]' in usage_event
    scanner = StreamScanner(strip_usage_chunk=True)
    out = feed_in_pieces(scanner, b"".join(events), size)
    assert out == b"".join(e for e in events if e != usage_event)
    assert scanner.usage is not None and scanner.usage.completion_tokens == 3


def test_cumulative_usage_in_every_chunk_keeps_the_last_value() -> None:
    scanner = StreamScanner(strip_usage_chunk=True)
    data = b"".join(stream(usage_chunk=False, usage_null=False, every=True))
    assert feed_in_pieces(scanner, data, 50) == data
    assert scanner.usage is not None
    assert (scanner.usage.prompt_tokens, scanner.usage.completion_tokens) == (7, 3)


def test_crlf_framing_and_an_unterminated_tail() -> None:
    chunk = b'data: {"choices":[{"delta":{"content":"x"}}]}\r\n\r\n'
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}\r\n\r\n'
    scanner = StreamScanner(strip_usage_chunk=True)
    out = scanner.feed(chunk + usage + b'data: [DONE]\r\n\r\ndata: {"partial"')
    assert out == chunk + b"data: [DONE]\r\n\r\n"
    assert scanner.done
    assert scanner.flush() == b'data: {"partial"'


def test_no_usage_reported_leaves_usage_unset_and_counts_events() -> None:
    scanner = StreamScanner(strip_usage_chunk=True)
    scanner.feed(b"".join(stream(usage_chunk=False, usage_null=False)))
    assert scanner.usage is None
    assert scanner.events >= 4


def test_a_zero_usage_is_a_value() -> None:
    scanner = StreamScanner(strip_usage_chunk=False)
    body = {"choices": [], "usage": {"prompt_tokens": 0, "completion_tokens": 0}}
    scanner.feed(b"data: " + orjson.dumps(body) + b"\n\n")
    assert scanner.usage is not None
    assert (scanner.usage.prompt_tokens, scanner.usage.completion_tokens) == (0, 0)


def test_unparsable_usage_lines_are_forwarded() -> None:
    scanner = StreamScanner(strip_usage_chunk=True)
    event = b'data: {"usage": broken\n\n'
    assert scanner.feed(event) == event
    assert scanner.usage is None


@pytest.mark.parametrize("size", [1, 64, 100_000])
def test_content_chunks_with_a_null_usage_are_not_decoded(size: int) -> None:
    # OpenAI's shape when asked for usage: "usage":null in every content chunk, the value at the end.
    events = stream(usage_null=True)
    assert sum(b'"usage":null' in e for e in events) >= 4
    scanner = StreamScanner(strip_usage_chunk=False)
    assert feed_in_pieces(scanner, b"".join(events), size) == b"".join(events)
    assert scanner.usage is not None and scanner.usage.completion_tokens == 3
    assert scanner.decoded == 1


@pytest.mark.parametrize(
    "usage",
    [b'"usage": null', b'"usage" :\tnull', b'"usage":\r\n null'],
)
def test_a_null_usage_is_recognised_whatever_the_spacing(usage: bytes) -> None:
    scanner = StreamScanner(strip_usage_chunk=True)
    event = b'data: {"choices":[{"delta":{"content":"x"}}],' + usage + b"}\n\n"
    assert scanner.feed(event) == event
    assert scanner.decoded == 0


@pytest.mark.parametrize(
    "usage",
    [
        b'"usage": {"prompt_tokens":2,"completion_tokens":5}',
        b'"usage":nullish, "usage":{"prompt_tokens":2,"completion_tokens":5}',
        b'"usage":' + b" " * 40 + b'{"prompt_tokens":2,"completion_tokens":5}',
    ],
)
def test_any_usage_that_is_not_plainly_null_is_read(usage: bytes) -> None:
    scanner = StreamScanner(strip_usage_chunk=False)
    event = b'data: {"choices":[],' + usage + b"}\n\n"
    scanner.feed(event)
    assert scanner.decoded == 1
    if b"nullish" not in usage:
        assert scanner.usage is not None and scanner.usage.completion_tokens == 5
