"""The record of a request: what a front feeds into it comes out in the usage event."""

from __future__ import annotations

import time

from services.common.errors import UpstreamError, UpstreamTimeout
from services.common.pb.relaygate.auth.v1.auth_pb2 import Principal
from services.common.pb.relaygate.common.v1.types_pb2 import Usage
from services.common.pb.relaygate.quota.v1.quota_pb2 import ReserveResponse, SettleResponse
from services.common.pricing import Price
from services.common.telemetry import request_id_var
from services.relay.meter.credit import Admission
from services.relay.meter.record import Exchange, refusals_summary


def test_a_begun_record_has_a_request_id_and_bounds_the_callers_id() -> None:
    exchange = Exchange.begin(endpoint="chat.completions", client_ip="10.0.0.7", client_request_id="c" * 500)
    assert exchange.request_id.startswith("req")
    assert request_id_var.get() == exchange.request_id
    assert exchange.client_request_id == "c" * 200


def test_the_event_carries_what_the_layers_fed() -> None:
    exchange = Exchange.begin(endpoint="chat.completions", client_ip="10.0.0.7")
    exchange.asked_for("gpt-4o-mini")
    exchange.planned(stream=True, choices=1)
    exchange.authenticated(Principal(key_id="key-1", user_id="user-1"))
    assert (exchange.attempt("ch-1"), exchange.attempt("ch-2")) == (1, 2)
    exchange.answered(channel_id="ch-2", upstream_model="gpt-4o-mini-2024", status=200)
    exchange.stream_ended("done", Usage(prompt_tokens=5, completion_tokens=7))
    event = exchange.to_event()
    assert (event.event_id, event.key_id, event.user_id) == (exchange.request_id, "key-1", "user-1")
    assert (event.channel_id, event.upstream_model, event.status_code) == ("ch-2", "gpt-4o-mini-2024", 200)
    assert (event.usage.prompt_tokens, event.usage.completion_tokens) == (5, 7)
    assert (event.stream, event.attempts, event.end_reason, event.client_ip) == (True, 2, "done", "10.0.0.7")
    assert event.error_type == "" and event.aggregated == 0


def test_every_attempts_upstream_time_adds_up_and_a_stream_counts_whole() -> None:
    exchange = Exchange.begin(endpoint="chat.completions", client_ip="", arrived=time.perf_counter() - 2.0)
    exchange.attempt("ch-1")
    exchange.waited_upstream(0.25)
    exchange.attempt("ch-2")
    exchange.upstream_responded(0.125)
    exchange.waited_upstream(0.5)
    event = exchange.to_event()
    assert (event.channel_id, event.attempts, event.ttfb_ms, event.upstream_ms) == ("ch-2", 2, 125, 750)
    exchange.stream_ended("client_gone", Usage(prompt_tokens=1, completion_tokens=2, estimated=True))
    # The stream's whole time is upstream time (the relay only waited on it).
    assert exchange.to_event().upstream_ms >= 2000
    assert exchange.to_event().end_reason == "client_gone"


def test_a_complete_answer_is_done_even_when_reading_it_fails_afterwards() -> None:
    exchange = Exchange.begin(endpoint="chat.completions", client_ip="")
    exchange.reserved(ReserveResponse(reservation_id="req-x", reserved_micros=100))
    exchange.answered(channel_id="ch-1", upstream_model="m", status=200, complete=True)
    exchange.fail(UpstreamError("unreadable answer"))
    event = exchange.to_event()
    assert (event.end_reason, event.error_type, event.status_code) == ("done", "provider", 502)
    # A reservation's event without usage releases its hold.
    assert not event.HasField("usage")


def test_a_cached_answer_is_delivered_with_its_status() -> None:
    exchange = Exchange.begin(endpoint="chat.completions", client_ip="")
    exchange.from_cache()
    exchange.delivered(Usage(prompt_tokens=3, completion_tokens=4), status=200)
    event = exchange.to_event()
    assert (event.cached, event.status_code, event.end_reason) == (True, 200, "done")
    assert (event.usage.prompt_tokens, event.usage.completion_tokens) == (3, 4)


def test_a_lease_admission_is_charged_at_its_price_and_finished_once() -> None:
    exchange = Exchange.begin(endpoint="chat.completions", client_ip="")
    price = Price(model="m", input_per_mtok=1_000_000, price_id=7)
    exchange.admitted(Admission(lease_id="lease-1", key_id="key-1", user_id="user-1", bound=50), price)
    assert exchange.held
    exchange.lease_finished(12)
    event = exchange.to_event()
    assert exchange.admission is None
    assert (event.lease_id, event.price_id, event.cost_micros) == ("lease-1", 7, 12)


def test_a_reservation_is_charged_by_its_event_or_by_quotas_settlement() -> None:
    by_event = Exchange.begin(endpoint="chat.completions", client_ip="")
    by_event.reserved(ReserveResponse(reservation_id="req-1", reserved_micros=100))
    by_event.charged(Price(model="m", price_id=3), 40)
    assert (by_event.to_event().price_id, by_event.to_event().cost_micros) == (3, 40)
    by_rpc = Exchange.begin(endpoint="chat.completions", client_ip="")
    by_rpc.reserved(ReserveResponse(reservation_id="req-2", reserved_micros=100))
    by_rpc.settled(SettleResponse(charged_micros=30, price_id=4))
    event = by_rpc.to_event()
    assert (event.reservation_id, event.price_id, event.cost_micros) == ("req-2", 4, 30)


def test_a_cancelled_request_delivered_nothing() -> None:
    exchange = Exchange.begin(endpoint="chat.completions", client_ip="")
    exchange.delivered(Usage(prompt_tokens=3))
    exchange.cancelled()
    assert exchange.usage is None
    first = exchange.wrote_first_byte()
    assert first == exchange.first_byte_s and first >= 0


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
