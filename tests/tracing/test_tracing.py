"""Tracing's switch and hooks in one process: off (nothing made, nothing exported) unless an OTLP
endpoint is set; on, spans reach the receiver when the service closes, and the trace context
survives a trip through Kafka-style record headers."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator

import orjson
import pytest

from services.common import tracing
from services.common.telemetry import JsonFormatter
from tests.tracing.collector import Collector

_SCOPE = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}


@pytest.fixture
def collector() -> Iterator[Collector]:
    with Collector() as running:
        yield running


@pytest.fixture(autouse=True)
def _no_otel_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "relay", "OTEL_TRACES_SAMPLER": "always_on"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_TRACES_EXPORTER": "none"}, False),
    ],
)
def test_tracing_is_on_only_with_an_endpoint(environ: dict[str, str], expected: bool) -> None:
    assert tracing.endpoint_configured(environ) is expected


@pytest.mark.parametrize(
    "environ",
    [
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_TRACES_EXPORTER": "zipkin"},
    ],
)
def test_a_configuration_it_cannot_honour_is_refused(environ: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        tracing.endpoint_configured(environ)


async def test_off_the_hooks_make_nothing() -> None:
    with tracing.traced("relay") as on:
        assert not on
        first, second = tracing.span("a"), tracing.span("b", {"k": 1})
        # One shared no-op, never a span of its own.
        assert first is second is tracing.http_request(_SCOPE) is tracing.attempt("ch", "fake", 1)
        with first as current:
            assert not current.is_recording()
            assert tracing.current_trace_id() == ""
            assert tracing.traceparent() is None
        work = asyncio.sleep(0)
        assert tracing.in_span("relay.stream", work, dict) is work
        await work
        assert tracing.client_interceptors() == []
        assert tracing.server_interceptors() == []


def test_disabled_sdk_exports_nothing(collector: Collector, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint)
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    with tracing.traced("relay") as on:
        assert not on
        with tracing.span("relay.verify_key"):
            pass
    assert collector.requests == 0 and collector.spans() == []


def test_a_trace_the_sampler_leaves_out_makes_no_children_and_sends_no_context(
    collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    with tracing.traced("relay") as on:
        assert on
        with tracing.http_request(_SCOPE) as request:
            assert not request.is_recording()
            # Children, the stream's task, log and event trace ids, Kafka headers: all skipped.
            assert tracing.span("relay.credit") is tracing.attempt("ch", "fake", 1) is tracing.producing("u")
            work = asyncio.sleep(0)
            assert tracing.in_span("relay.stream", work, dict) is work
            work.close()
            assert tracing.current_trace_id() == ""
            assert tracing.traceparent() is None
    assert collector.spans() == []


def test_on_spans_reach_the_receiver_when_the_service_closes(
    collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint)
    # Far beyond the test: only the flush on close can have sent them.
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "60000")
    formatter = JsonFormatter("relay")
    with tracing.traced("relay") as on:
        assert on
        assert len(tracing.client_interceptors()) == 1
        with tracing.span("relay.credit") as credit:
            trace_id = tracing.current_trace_id()
            line = orjson.loads(formatter.format(_record("held")))
            with tracing.producing("usage"):
                headers = tracing.traceparent()
        assert headers is not None and dict(headers)["traceparent"].decode().split("-")[1] == trace_id
        # Off a span, log lines carry no trace id.
        assert "trace_id" not in orjson.loads(formatter.format(_record("idle")))
        with tracing.consumed("usage", headers, 0, 7):
            pass
        link = tracing.link_from(headers)
        assert link is not None
        with tracing.batch_span("LogConsumer.write", [link], 1):
            pass
        # A public gRPC front's call span: one per call, also when the server's interceptor opened it.
        method = "/relaygate.relay.v1.InferenceService/CreateChatCompletion"
        caller = [("traceparent", dict(headers)["traceparent"].decode())]
        with tracing.grpc_request(method, caller) as call, tracing.grpc_request(method, ()) as again:
            assert again is call
        assert collector.spans() == []
    assert line["trace_id"] == trace_id
    spans = {s.name: s for s in collector.spans()}
    assert set(spans) == {
        "relay.credit",
        "publish usage",
        "process usage",
        "LogConsumer.write",
        method.lstrip("/"),
    }
    assert spans[method.lstrip("/")].parent_span_id == spans["publish usage"].span_id
    assert all(s.service == "relaygate-relay" for s in spans.values())
    publish = spans["publish usage"]
    assert publish.parent_span_id == credit.get_span_context().span_id.to_bytes(8, "big").hex()
    assert spans["process usage"].trace_id == trace_id
    assert spans["process usage"].parent_span_id == publish.span_id
    assert spans["process usage"].attributes["messaging.kafka.offset"] == 7
    write = spans["LogConsumer.write"]
    assert write.trace_id != trace_id and write.links == ((trace_id, publish.span_id),)
    assert not tracing.enabled()


def _record(message: str) -> logging.LogRecord:
    return logging.LogRecord("t", logging.INFO, "", 0, message, (), None)
