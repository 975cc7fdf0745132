"""One streamed request through the whole stack (four processes, real Kafka), exporting to an OTLP
receiver: one trace holds the relay's spans, auth's and quota's server spans (over gRPC metadata)
and the consumers' per-record spans (over Kafka headers); the consumers' batch writes link back to
it, and the request-log row holds its trace id."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from devinfra.backing import BackingServices
from tests.db_fixtures import DbUrls
from tests.e2e.stack import MODEL, Deployment, deploy, fund_user
from tests.tracing.collector import Collector, ReceivedSpan, describe, in_trace


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    with Collector() as running:
        yield running


@pytest.fixture(scope="module")
def deployment(
    backing: BackingServices,
    migrated_db: DbUrls,
    collector: Collector,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Deployment]:
    otel = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
        # Export within a tenth of a second instead of five.
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    with deploy(backing, migrated_db, tmp_path_factory.mktemp("stack-logs"), service_env=otel) as running:
        yield running


def _named(spans: list[ReceivedSpan], service: str, name: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.service == service and s.name == name]


def _complete(trace_id: str) -> Callable[[list[ReceivedSpan]], bool]:
    """Whether the request's trace reached the logger, and the logger's batch write links to it."""

    def check(spans: list[ReceivedSpan]) -> bool:
        names = {(s.service, s.name) for s in in_trace(spans, trace_id)}
        reached_logger = any(service == "relaygate-logger" for service, _ in names)
        linked = any(s.name == "LogConsumer.write" and trace_id in dict(s.links) for s in spans)
        return reached_logger and linked and ("relaygate-relay", "relay.stream") in names

    return check


def test_one_streamed_request_is_one_trace_across_every_hop(
    deployment: Deployment, collector: Collector
) -> None:
    _user_id, key = fund_user(deployment, 10_000_000)
    # The caller's own trace context is joined: the whole request is found under its trace id.
    trace_id = secrets.token_hex(16)
    caller_span = secrets.token_hex(8)
    with httpx.stream(
        "POST",
        f"{deployment.relay_url}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "trace me"}], "stream": True},
        headers={"authorization": f"Bearer {key}", "traceparent": f"00-{trace_id}-{caller_span}-01"},
        timeout=10,
    ) as response:
        assert response.status_code == 200, response.read()
        body = b"".join(response.iter_raw())
    assert b"data: [DONE]" in body

    spans = collector.wait_for(_complete(trace_id))
    mine = list(in_trace(spans, trace_id))
    by_id = {s.span_id: s for s in mine}

    def parent_of(span: ReceivedSpan) -> ReceivedSpan:
        assert span.parent_span_id in by_id, f"{span.name}'s parent is not in the trace:\n{describe(mine)}"
        return by_id[span.parent_span_id]

    (front,) = _named(mine, "relaygate-relay", "POST /v1/chat/completions")
    assert front.kind == "server" and front.parent_span_id == caller_span
    assert front.attributes["http.response.status_code"] == 200
    request_id = front.attributes["relaygate.request_id"]

    (verify,) = _named(mine, "relaygate-relay", "relay.verify_key")
    assert parent_of(verify) is front
    # Auth verified the new key under the relay's span: the context crossed gRPC metadata.
    auth = [s for s in mine if s.service == "relaygate-auth"]
    assert auth and all(s.kind == "server" for s in auth), describe(mine)
    assert any(parent_of(s) is verify for s in auth)

    (credit,) = _named(mine, "relaygate-relay", "relay.credit")
    assert parent_of(credit) is front
    assert credit.attributes["relaygate.credit.held_on"] in ("lease", "reservation")
    if credit.attributes["relaygate.credit.held_on"] == "reservation":
        assert any(s.service == "relaygate-quota" and parent_of(s) is credit for s in mine)

    (attempt,) = _named(mine, "relaygate-relay", "upstream.attempt")
    assert parent_of(attempt) is front
    assert attempt.attributes["relaygate.upstream.attempt"] == 1
    assert attempt.attributes["http.response.status_code"] == 200
    assert attempt.attributes["relaygate.channel.name"] == "fake"
    assert attempt.attributes["relaygate.upstream.ttfb_ms"] > 0

    (stream,) = _named(mine, "relaygate-relay", "relay.stream")
    assert parent_of(stream) is front
    assert stream.attributes["relaygate.stream.end_reason"] == "done"
    assert stream.attributes["relaygate.stream.chunks"] > 0

    (publish,) = [s for s in mine if s.kind == "producer"]
    assert parent_of(publish) is stream
    # The usage event crossed Kafka with its context: each consumer's span for it is the publish
    # span's child, in the logger and in quota's settlement.
    consumers = [s for s in mine if s.kind == "consumer"]
    assert {s.service for s in consumers} == {"relaygate-logger", "relaygate-quota"}, describe(mine)
    assert all(parent_of(s) is publish for s in consumers)

    # The logger's batch write is a trace of its own, linked to the request's publish span.
    writes = [s for s in spans if s.name == "LogConsumer.write" and (trace_id, publish.span_id) in s.links]
    assert len(writes) == 1 and writes[0].trace_id != trace_id
    # Quota's settlement of the request's hold likewise.
    collector.wait_for(
        lambda found: any(
            s.name == "SettlingConsumer.write" and (trace_id, publish.span_id) in s.links for s in found
        )
    )

    row = _log_row(deployment, request_id)
    assert row["trace_id"] == trace_id


def _log_row(deployment: Deployment, request_id: str, timeout: float = 15.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    with deployment.admin() as admin:
        while True:
            rows = admin.get("/admin/v1/logs", params={"limit": 50}).json().get("logs", [])
            found = [row for row in rows if row.get("event_id") == request_id]
            if found:
                return dict(found[0])
            assert time.monotonic() < deadline, rows
            time.sleep(0.2)
