"""OpenTelemetry tracing, configured by the standard ``OTEL_*`` variables and off unless asked for.

Each service's lifespan enters :func:`traced` once; it installs a tracer when an OTLP endpoint is set
(``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT``) and neither
``OTEL_SDK_DISABLED=true`` nor ``OTEL_TRACES_EXPORTER=none`` says otherwise, and flushes it on the
way out. Spans go out in batches (``OTEL_BSP_*``) over OTLP/HTTP with protobuf bodies: the protocol
the specification makes the default, which every collector accepts on 4318, and whose exporter posts
from its own thread, so it shares nothing with the services' ``grpc.aio`` event loops. The SDK reads the
rest itself: ``OTEL_TRACES_SAMPLER``/``_ARG``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_EXPORTER_OTLP_*``
headers, timeout and compression, the span limits.

Off, the hooks the request path calls (:func:`span`, :func:`annotate`, :func:`traceparent`,
:func:`current_trace_id`, ...) read one attribute and return: no span, context or dict is made, and
no gRPC interceptor is installed (:func:`client_interceptors` is empty). On, inside a trace the
sampler left out, they do the same past the request's root span: no child spans, no context sent on
to auth, quota or Kafka, no trace id in logs or usage events.

Propagation is W3C trace context: ``traceparent`` (and ``tracestate``) in gRPC metadata, so auth's and
quota's server spans join the caller's trace, and in Kafka record headers, so the consumers of usage
events (the logger, quota's settlement) start a span per record under the request's publish span and
link their batch-write span to every request the batch holds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import (
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    MutableMapping,
    Sequence,
)
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Span, SpanKind, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from services.common.interceptors import MethodInterceptor

__all__ = [
    "Carrier",
    "Link",
    "annotate",
    "attempt",
    "attempt_answered",
    "attempt_failed",
    "batch_span",
    "client_interceptors",
    "consumed",
    "current_trace_id",
    "enabled",
    "grpc_request",
    "http_request",
    "in_span",
    "link_from",
    "producing",
    "server_interceptors",
    "span",
    "status_into",
    "traced",
    "traceparent",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Kafka record headers (and gRPC metadata keys) carrying the trace context.
TRACEPARENT: Final = "traceparent"
TRACESTATE: Final = "tracestate"
# Kafka headers as aiokafka takes and gives them.
Carrier = Sequence[tuple[str, bytes]]
# What a consumer's batch span points back to, one per request (see :func:`link_from`).
Link = trace.Link

_PROPAGATOR: Final = TraceContextTextMapPropagator()
# How long a service on its way out waits for its last spans to be exported.
FLUSH_S: Final = 5.0
_TRUE: Final = frozenset({"true", "1", "yes", "on"})


class _Current:
    """The process's tracer, None while tracing is off.

    The request path reaches it from many layers without it being threaded through each, as the
    OpenTelemetry API does with its global provider; unlike that global it can be replaced, since
    tests start and stop services several times in one process.
    """

    __slots__ = ("tracer",)

    def __init__(self) -> None:
        self.tracer: Tracer | None = None


_CURRENT: Final = _Current()

if TYPE_CHECKING:
    _UnaryClientInterceptor = grpc.aio.UnaryUnaryClientInterceptor[Any, Any]
else:  # generic only in the type stubs
    _UnaryClientInterceptor = grpc.aio.UnaryUnaryClientInterceptor

# What the hooks return while tracing is off: one shared context manager around the API's own
# non-recording span, whose methods do nothing.
_OFF: Final = contextlib.nullcontext(trace.INVALID_SPAN)


# --- configuration ---------------------------------------------------------------------------------


def endpoint_configured(environ: Mapping[str, str]) -> bool:
    """Whether ``environ`` asks for spans to be exported (see the module docstring)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() in _TRUE:
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    if exporter == "none":
        return False
    if exporter != "otlp":
        raise ValueError(f"OTEL_TRACES_EXPORTER={exporter!r}: only 'otlp' (or 'none') is supported")
    if not (environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")):
        return False
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    )
    if protocol.strip().lower() != "http/protobuf":
        raise ValueError(f"OTLP protocol {protocol!r}: traces are exported over 'http/protobuf' only")
    return True


def _exporter() -> SpanExporter:
    # Imported here: the exporter pulls in requests, which a process without tracing never needs.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


@contextlib.contextmanager
def traced(service: str) -> Iterator[bool]:
    """Trace this process as ``service`` (``OTEL_SERVICE_NAME`` overrides it) while the block runs,
    when the environment asks for it; yields whether it does. Spans still queued are exported on the
    way out. In a process already traced (several services started in one test process) the first
    service's tracer serves them all."""
    env = os.environ
    if _CURRENT.tracer is not None or not endpoint_configured(env):
        yield _CURRENT.tracer is not None
        return
    name = env.get("OTEL_SERVICE_NAME") or f"relaygate-{service}"
    # Resource.create reads OTEL_RESOURCE_ATTRIBUTES; the service name set here wins over it.
    provider = TracerProvider(
        resource=Resource.create({"service.name": name, "service.namespace": "relaygate"})
    )
    provider.add_span_processor(BatchSpanProcessor(_exporter()))
    _CURRENT.tracer = provider.get_tracer("relaygate")
    log.info("tracing on", extra={"service_name": name})
    try:
        yield True
    finally:
        _CURRENT.tracer = None
        _shut_down(provider, FLUSH_S)


def _shut_down(provider: TracerProvider, timeout_s: float) -> None:
    """Export what is queued and stop, for at most ``timeout_s``: the SDK's own shutdown waits up to
    30 s per processor (longer with a collector that does not answer), and its caller is a service on
    its way out."""
    # A daemon thread: one still exporting when the process exits does not hold it up.
    worker = threading.Thread(target=provider.shutdown, name="tracing-shutdown", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        log.warning("spans not exported within %g s of shutting down were dropped", timeout_s)


def enabled() -> bool:
    return _CURRENT.tracer is not None


# --- spans -----------------------------------------------------------------------------------------


def _child_tracer() -> Tracer | None:
    """The tracer for a child of the current span: None while off, and inside a trace the sampler
    left out, whose children would only be made to be dropped (what sampling saves is then most of
    the cost of tracing, not just the export)."""
    tracer = _CURRENT.tracer
    if tracer is None:
        return None
    current = trace.get_current_span()
    if current.get_span_context().is_valid and not current.is_recording():
        return None
    return tracer


def span(
    name: str,
    attributes: Mapping[str, AttributeValue] | None = None,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
) -> contextlib.AbstractContextManager[Span]:
    """A child of the current span, current while the block runs (a shared no-op while off)."""
    tracer = _child_tracer()
    if tracer is None:
        return _OFF
    return tracer.start_as_current_span(name, kind=kind, attributes=attributes)


def annotate(key: str, value: AttributeValue) -> None:
    """Set an attribute on the current span."""
    if _CURRENT.tracer is not None:
        trace.get_current_span().set_attribute(key, value)


def in_span(
    name: str, work: Coroutine[Any, Any, T], attributes: Callable[[], Mapping[str, AttributeValue]]
) -> Coroutine[Any, Any, T]:
    """``work`` run inside a span named ``name`` that ends with ``attributes()`` set (for a task that
    outlives the block that started it, such as a stream's pump); ``work`` itself while off."""
    tracer = _child_tracer()
    if tracer is None:
        return work
    return _run_in_span(tracer, name, work, attributes)


async def _run_in_span(
    tracer: Tracer,
    name: str,
    work: Coroutine[Any, Any, T],
    attributes: Callable[[], Mapping[str, AttributeValue]],
) -> T:
    with tracer.start_as_current_span(name) as current:
        try:
            return await work
        finally:
            current.set_attributes(attributes())


def current_trace_id() -> str:
    """The current trace's id in hex, "" outside a traced request (and in one the sampler left out:
    no backend has it)."""
    if _CURRENT.tracer is None:
        return ""
    found = trace.get_current_span().get_span_context()
    return trace.format_trace_id(found.trace_id) if found.trace_flags.sampled else ""


# --- the HTTP front ---------------------------------------------------------------------------------

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
# Polled by probes and scrapers every few seconds: traces of them would bury the requests'.
_PROBES: Final = frozenset({"/healthz", "/readyz", "/metrics"})


def http_request(scope: Mapping[str, Any]) -> contextlib.AbstractContextManager[Span]:
    """The server span of one ASGI HTTP request, a child of the caller's own trace when its
    ``traceparent`` header names one."""
    tracer = _CURRENT.tracer
    if tracer is None or scope["path"] in _PROBES:
        return _OFF
    carrier = {
        key.decode("latin-1"): value.decode("latin-1")
        for key, value in scope["headers"]
        if key in (b"traceparent", b"tracestate")
    }
    method: str = scope["method"]
    path: str = scope["path"]
    return tracer.start_as_current_span(
        f"{method} {path}",
        context=_PROPAGATOR.extract(carrier) if carrier else None,
        kind=SpanKind.SERVER,
        attributes={"http.request.method": method, "url.path": path},
    )


def grpc_request(
    method: str, metadata: Iterable[tuple[str, Any]] | None
) -> contextlib.AbstractContextManager[Span]:
    """The server span of one call on a public gRPC front (``method``: ``/package.Service/Method``),
    a child of the caller's trace when its metadata carries a ``traceparent``. Unlike
    :class:`ServerTracing` (internal calls, traced only as part of a request) it always starts one."""
    tracer = _CURRENT.tracer
    if tracer is None:
        return _OFF
    span_name = method.lstrip("/")
    current = trace.get_current_span()
    if current.is_recording() and getattr(current, "name", None) == span_name:
        # The server's own interceptor (ServerTracing) opened it: the caller sent its context.
        return contextlib.nullcontext(current)
    carrier = {str(key): str(value) for key, value in metadata or () if key in (TRACEPARENT, TRACESTATE)}
    service, _, name = span_name.rpartition("/")
    return tracer.start_as_current_span(
        span_name,
        context=_PROPAGATOR.extract(carrier) if carrier else None,
        kind=SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
    )


def status_into(request_span: Span, send: Send) -> Send:
    """``send``, noting the response's status on ``request_span`` (``send`` itself while off)."""
    if _CURRENT.tracer is None or not request_span.is_recording():
        return send

    async def sending(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status: int = message["status"]
            request_span.set_attribute("http.response.status_code", status)
            if status >= 500:
                request_span.set_status(trace.StatusCode.ERROR)
        await send(message)

    return sending


# --- upstream attempts -----------------------------------------------------------------------------


def attempt(channel_id: str, channel_name: str, number: int) -> contextlib.AbstractContextManager[Span]:
    """The span of one upstream attempt, current while it runs."""
    tracer = _child_tracer()
    if tracer is None:
        return _OFF
    return tracer.start_as_current_span(
        "upstream.attempt",
        kind=SpanKind.CLIENT,
        attributes={
            "relaygate.channel.id": channel_id,
            "relaygate.channel.name": channel_name,
            "relaygate.upstream.attempt": number,
        },
    )


def attempt_answered(status: int, ttfb_s: float) -> None:
    """The current upstream attempt got an answer: its status and time to first byte."""
    if _CURRENT.tracer is not None:
        current = trace.get_current_span()
        current.set_attribute("http.response.status_code", status)
        current.set_attribute("relaygate.upstream.ttfb_ms", round(ttfb_s * 1000, 3))
        if status >= 400:
            current.set_status(trace.StatusCode.ERROR)


def attempt_failed(outcome: str, message: str) -> None:
    """The current upstream attempt failed before an answer (``outcome``: timeout, transport, ...)."""
    if _CURRENT.tracer is not None:
        current = trace.get_current_span()
        current.set_attribute("error.type", outcome)
        current.set_status(trace.StatusCode.ERROR, message)


# --- propagation: Kafka record headers -------------------------------------------------------------


def traceparent() -> Carrier | None:
    """The current span's context as Kafka record headers, None when there is none to send (none
    either for a trace the sampler left out: its consumers would make spans only to drop them)."""
    if _CURRENT.tracer is None or not trace.get_current_span().is_recording():
        return None
    found: dict[str, str] = {}
    _PROPAGATOR.inject(found)
    if not found:
        return None
    return [(key, value.encode()) for key, value in found.items()]


def producing(topic: str) -> contextlib.AbstractContextManager[Span]:
    """The span of handing one record for ``topic`` to the producer (what its consumers link to)."""
    tracer = _child_tracer()
    if tracer is None:
        return _OFF
    return tracer.start_as_current_span(
        f"publish {topic}",
        kind=SpanKind.PRODUCER,
        attributes={"messaging.system": "kafka", "messaging.destination.name": topic},
    )


def _context_of(headers: Iterable[tuple[str, bytes]] | None) -> otel_context.Context | None:
    if not headers:
        return None
    carrier = {key: value.decode("latin-1") for key, value in headers if key in (TRACEPARENT, TRACESTATE)}
    if TRACEPARENT not in carrier:
        return None
    return _PROPAGATOR.extract(carrier)


def link_from(headers: Iterable[tuple[str, bytes]] | None) -> Link | None:
    """A link to the span that produced a record with ``headers`` (None when it carried none)."""
    if _CURRENT.tracer is None:
        return None
    parent = _context_of(headers)
    if parent is None:
        return None
    found = trace.get_current_span(parent).get_span_context()
    return Link(found) if found.is_valid else None


def consumed(
    topic: str, headers: Iterable[tuple[str, bytes]] | None, partition: int, offset: int
) -> contextlib.AbstractContextManager[Span]:
    """A consumer's span for taking one record, a child of the span that produced it (a no-op for a
    record that carries no trace context)."""
    tracer = _CURRENT.tracer
    if tracer is None:
        return _OFF
    parent = _context_of(headers)
    if parent is None:
        return _OFF
    return tracer.start_as_current_span(
        f"process {topic}",
        context=parent,
        kind=SpanKind.CONSUMER,
        attributes={
            "messaging.system": "kafka",
            "messaging.destination.name": topic,
            "messaging.destination.partition.id": str(partition),
            "messaging.kafka.offset": offset,
        },
    )


def batch_span(name: str, links: Sequence[Link], size: int) -> contextlib.AbstractContextManager[Span]:
    """A consumer's span for writing one batch, linked to the requests whose records it holds (the
    SDK keeps the first ``OTEL_LINK_COUNT_LIMIT``, 128 by default)."""
    tracer = _CURRENT.tracer
    if tracer is None:
        return _OFF
    return tracer.start_as_current_span(
        name,
        context=otel_context.Context(),
        links=links,
        attributes={"messaging.batch.message_count": size},
    )


# --- propagation: gRPC metadata --------------------------------------------------------------------


class _ClientTracing(_UnaryClientInterceptor):
    """Sends the current trace context with each unary call (nothing when no recorded span is current)."""

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        found: dict[str, str] = {}
        # A trace the sampler left out goes no further: the peer would only make spans to drop them.
        if trace.get_current_span().is_recording():
            _PROPAGATOR.inject(found)
        if found:
            metadata = grpc.aio.Metadata(*(client_call_details.metadata or ()))
            for key, value in found.items():
                metadata[key] = value
            client_call_details = grpc.aio.ClientCallDetails(
                client_call_details.method,
                client_call_details.timeout,
                metadata,
                client_call_details.credentials,
                client_call_details.wait_for_ready,
            )
        return await continuation(client_call_details, request)


class ServerTracing(MethodInterceptor):
    """A server span for each unary call that arrives with a trace context, as its child.

    Calls without one (the services' own background refreshes) are served untraced, so they add no
    root traces of their own."""

    def __init__(self, tracer: Tracer) -> None:
        super().__init__()
        self._tracer = tracer

    def wrap(self, method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        if handler.unary_unary is None:
            return handler
        inner: Callable[[Any, Any], Awaitable[Any]] = handler.unary_unary
        tracer = self._tracer
        service, _, name = method.lstrip("/").rpartition("/")
        attributes: dict[str, AttributeValue] = {
            "rpc.system": "grpc",
            "rpc.service": service,
            "rpc.method": name,
        }
        span_name = method.lstrip("/")

        async def behavior(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            carrier = {
                str(key): str(value)
                for key, value in (context.invocation_metadata() or ())
                if key in (TRACEPARENT, TRACESTATE)
            }
            if TRACEPARENT not in carrier:
                return await inner(request, context)
            with tracer.start_as_current_span(
                span_name, context=_PROPAGATOR.extract(carrier), kind=SpanKind.SERVER, attributes=attributes
            ):
                return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            behavior,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """What a gRPC channel built now needs (none while tracing is off: an aio interceptor costs
    every call a detour)."""
    # The stubs leave the aio interceptor types abstract ("cast or ignore").
    return [cast(grpc.aio.ClientInterceptor, _ClientTracing())] if _CURRENT.tracer is not None else []


def server_interceptors() -> list[MethodInterceptor]:
    tracer = _CURRENT.tracer
    return [ServerTracing(tracer)] if tracer is not None else []
