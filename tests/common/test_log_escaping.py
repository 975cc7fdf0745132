"""Log lines cannot be forged: caller text never breaks a line or reaches a file as a control byte."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from services.common.telemetry import JsonFormatter, TextFormatter, escape_control

HOSTILE = "gpt-4o\n{fake log line}\r\x1b[31m\x00\x7f\x9b\u2028\u2029\u202e"
# What must not appear raw in a log file: C0/C1 controls (a trailing newline ends each record), DEL,
# line/paragraph separators, bidi overrides.
UNSAFE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


@pytest.fixture
def captured(request: pytest.FixtureRequest) -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(request.param("test"))
    logger = logging.getLogger(f"tests.log_escaping.{request.param.__name__}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    yield logger, stream
    logger.handlers.clear()


def log_hostile(logger: logging.Logger) -> None:
    logger.warning("request failed: The model %r does not exist", HOSTILE, extra={"model": HOSTILE})
    try:
        raise ValueError(f"bad model {HOSTILE}")
    except ValueError:
        logger.exception("unhandled error in %s", "/v1/" + HOSTILE)


@pytest.mark.parametrize("captured", [TextFormatter, JsonFormatter], indirect=True)
def test_hostile_strings_stay_inside_their_record(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    log_hostile(logger)
    lines = stream.getvalue().splitlines(keepends=True)
    assert len(lines) == 2, lines
    for line in lines:
        assert line.endswith("\n")
        assert not UNSAFE.search(line[:-1]), repr(line)
        assert "{fake log line}" in line


def test_text_records_show_the_escapes_and_the_fields() -> None:
    record = logging.LogRecord("relay", logging.WARNING, __file__, 1, "model %s", (HOSTILE,), None)
    record.channel = "openai primary"
    line = TextFormatter("relay").format(record)
    assert "model gpt-4o\\n{fake log line}\\r\\x1b[31m\\x00\\x7f\\x9b\\u2028\\u2029\\u202e" in line
    assert line.endswith(' channel="openai primary"')


def test_json_records_decode_to_the_original_text() -> None:
    record = logging.LogRecord("relay", logging.WARNING, __file__, 1, "model %s", (HOSTILE,), None)
    record.model = HOSTILE
    line = JsonFormatter("relay").format(record)
    assert not UNSAFE.search(line)
    decoded = json.loads(line)
    assert decoded["msg"] == f"model {HOSTILE}" and decoded["model"] == HOSTILE


def test_escape_control_leaves_ordinary_text_alone() -> None:
    text = "café — 東京 \\n stays as typed"
    assert escape_control(text) == text
