"""The record of a request: what a front feeds into it comes out in the usage event."""

from __future__ import annotations

from services.common.errors import UpstreamTimeout
from services.common.pb.relaygate.auth.v1.auth_pb2 import Principal
from services.common.pb.relaygate.common.v1.types_pb2 import Usage
from services.common.telemetry import request_id_var
from services.relay.meter.record import Exchange, refusals_summary


def test_a_begun_record_has_a_request_id_and_bounds_the_callers_id() -> None:
    exchange = Exchange.begin(endpoint="chat.completions", client_ip="10.0.0.7", client_request_id="c" * 500)
    assert exchange.request_id.startswith("req")
    assert request_id_var.get() == exchange.request_id
    assert exchange.client_request_id == "c" * 200


def test_the_event_carries_what_the_layers_fed() -> None:
    exchange = Exchange.begin(endpoint="chat.completions", client_ip="10.0.0.7")
    exchange.principal = Principal(key_id="key-1", user_id="user-1")
    exchange.model = "gpt-4o-mini"
    exchange.stream = True
    exchange.attempts = 2
    exchange.answered(channel_id="ch-2", upstream_model="gpt-4o-mini-2024", status=200)
    exchange.usage = Usage(prompt_tokens=5, completion_tokens=7)
    exchange.end_reason = "done"
    event = exchange.to_event()
    assert (event.event_id, event.key_id, event.user_id) == (exchange.request_id, "key-1", "user-1")
    assert (event.channel_id, event.upstream_model, event.status_code) == ("ch-2", "gpt-4o-mini-2024", 200)
    assert (event.usage.prompt_tokens, event.usage.completion_tokens) == (5, 7)
    assert (event.stream, event.attempts, event.end_reason, event.client_ip) == (True, 2, "done", "10.0.0.7")
    assert event.error_type == "" and event.aggregated == 0


def test_a_failure_is_recorded_with_its_fault() -> None:
    exchange = Exchange.begin(endpoint="embeddings", client_ip="")
    exchange.fail(UpstreamTimeout("slow"))
    event = exchange.to_event()
    assert (event.end_reason, event.error_type, event.error_code) == (
        "refused",
        "provider",
        UpstreamTimeout.code,
    )
    assert event.status_code == UpstreamTimeout.http_status


def test_a_refusals_summary_stands_for_many() -> None:
    last = Exchange.begin(endpoint="models", client_ip="10.0.0.9")
    last.fail(UpstreamTimeout("slow"))
    summary = refusals_summary(last.to_event(), event_id="refusals-r-12", second=12, count=40)
    assert (summary.event_id, summary.occurred_at_ms, summary.aggregated) == ("refusals-r-12", 12_000, 40)
    assert (summary.endpoint, summary.client_ip, summary.key_id) == ("models", "10.0.0.9", "")
