"""gRPC plumbing written once: the server loop every service runs, and the client-side call helper.

Servers run on ``grpc.aio`` with the standard health and reflection services, behind mutual TLS and the
permission check of :mod:`services.common.rpc_auth` (plaintext only when explicitly chosen for local
development); clients present their own certificate (:func:`channel`). On SIGTERM/SIGINT health flips to
NOT_SERVING first (so load balancers stop routing), then in-flight RPCs get ``grpc_drain_seconds`` to
finish. :class:`GatewayError` raised by a handler becomes a status plus trailing metadata in
:class:`ErrorInterceptor`, and so does a database outage (:func:`services.common.db.errors.unavailable`:
503, never 500); :func:`call` turns that back into the same exception on the client side.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from services.common import tracing
from services.common.db.errors import unavailable
from services.common.errors import (
    ERROR_CODE_KEY,
    PEER_UNAVAILABLE,
    GatewayError,
    ServiceUnavailable,
    from_wire,
    to_wire,
)
from services.common.interceptors import MethodInterceptor
from services.common.renewing_channel import RenewingChannel
from services.common.rpc_auth import RpcAuthInterceptor, ServerSecurity
from services.common.tasks import cancel_and_wait
from services.common.telemetry import METRICS
from services.common.tls import Tls, server_name

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")

# Keepalive keeps idle channels through NATs and lets both sides notice dead peers.
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    # After a peer restarts, calls fail fast until the channel reconnects; keep that window short
    # (gRPC's defaults back off up to two minutes).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    # Spread calls over every address the name resolves to (a headless Service lists each pod).
    ("grpc.lb_policy_name", "round_robin"),
]
SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
]


@dataclass(frozen=True)
class Registration:
    """One servicer and the generated function that adds it to a server."""

    service_name: str
    servicer: object
    add_to_server: Callable[[Any, grpc.aio.Server], None]


class ErrorInterceptor(MethodInterceptor):
    """Maps :class:`GatewayError` to status + metadata, and records per-method metrics."""

    def wrap(self, method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        name = method.rsplit("/", 1)[-1]
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _mapped(name, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        # A server stream written with ``context.write`` is a coroutine like a unary call (an async
        # generator would need a generator wrapper; none of ours is one).
        if handler.unary_stream is not None and inspect.iscoroutinefunction(handler.unary_stream):
            return grpc.unary_stream_rpc_method_handler(
                _mapped(name, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


def _mapped(name: str, inner: Callable[[Any, Any], Awaitable[Any]]) -> Callable[[Any, Any], Awaitable[Any]]:
    served = {code: METRICS.rpc_served.labels(method=name, code=code) for code in ("ok", "error", "crash")}
    latency = METRICS.rpc_latency.labels(method=name)

    async def behavior(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        started = time.perf_counter()
        try:
            response = await inner(request, context)
        except GatewayError as exc:
            served["error"].inc()
            await context.abort(exc.grpc_status, exc.message, trailing_metadata=to_wire(exc))
        except grpc.aio.AbortError:
            # The handler ended the call itself, with its own status and details.
            served["error"].inc()
            raise
        except Exception as exc:
            outage = unavailable(exc)
            if outage is None:
                served["crash"].inc()
                log.exception("unhandled error in %s", name)
                await context.abort(grpc.StatusCode.INTERNAL, "internal error", trailing_metadata=())
            else:
                served["error"].inc()
                log.warning("%s: %s (%s)", name, outage.message, exc)
                await context.abort(outage.grpc_status, outage.message, trailing_metadata=to_wire(outage))
        served["ok"].inc()
        latency.observe(time.perf_counter() - started)
        return response

    return behavior


async def serve(
    registrations: Iterable[Registration],
    *,
    listen: str,
    drain_seconds: float,
    security: ServerSecurity,
    stop: asyncio.Event | None = None,
    on_started: Callable[[int], None] | None = None,
    signals: bool = True,
    options: Sequence[tuple[str, Any]] = (),
    ready: asyncio.Event | None = None,
) -> None:
    """Run a gRPC server until SIGTERM/SIGINT (or ``stop``), then drain and return.

    ``on_started`` receives the bound port (useful with ``:0``). A server whose services have an RPC
    without a permission rule refuses to start. ``signals=False`` leaves SIGTERM/SIGINT to whoever
    owns them in this process (the relay's uvicorn), which then sets ``stop``. ``options`` replace
    :data:`SERVER_OPTIONS` of the same name. With ``ready``, health says NOT_SERVING until it is set.
    """
    registrations = list(registrations)
    names = [reg.service_name for reg in registrations]
    _check_rules(names, security)
    interceptors: list[MethodInterceptor] = [ErrorInterceptor()]
    if security.tls is None:
        log.warning("grpc is plaintext (RELAYGATE_GRPC_TLS=off): callers are not authenticated")
    else:
        interceptors.insert(0, RpcAuthInterceptor(security.rules, security.admin_tokens))
    # Outermost, so that a refused call is in its trace too.
    interceptors[:0] = tracing.server_interceptors()
    server = grpc.aio.server(
        interceptors=interceptors, options=list((dict(SERVER_OPTIONS) | dict(options)).items())
    )
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for reg in registrations:
        reg.add_to_server(reg.servicer, server)
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    if security.tls is None:
        port = server.add_insecure_port(listen)
    else:
        credentials = security.tls.server_credentials(require_client_auth=security.client_certificates)
        port = server.add_secure_port(listen, credentials)
    if port == 0:
        raise RuntimeError(f"could not listen on {listen}")
    probes = _probe_server(health_servicer, security.health_listen)
    await server.start()
    if probes is not None:
        await probes.start()
    serving = await _health(health_servicer, ["", *names], ready)
    log.info("grpc listening", extra={"listen": listen, "port": port, "tls": security.tls is not None})
    if on_started is not None:
        on_started(port)

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    handled = (signal.SIGTERM, signal.SIGINT) if signals else ()
    for sig in handled:
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        log.info("draining", extra={"drain_seconds": drain_seconds})
        if serving is not None:
            await cancel_and_wait(serving)
        await health_servicer.enter_graceful_shutdown()
        await server.stop(drain_seconds)
        if probes is not None:
            await probes.stop(None)


async def _health(
    health: HealthServicer, names: list[str], ready: asyncio.Event | None
) -> asyncio.Task[None] | None:
    """SERVING now, or NOT_SERVING and the task that says SERVING once ``ready`` is set."""

    async def set_all(status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        for name in names:
            await health.set(name, status)

    if ready is None or ready.is_set():
        await set_all(health_pb2.HealthCheckResponse.SERVING)
        return None
    await set_all(health_pb2.HealthCheckResponse.NOT_SERVING)

    async def serve_when_ready() -> None:
        await ready.wait()
        await set_all(health_pb2.HealthCheckResponse.SERVING)

    return asyncio.create_task(serve_when_ready(), name="grpc-health-ready")


def _check_rules(service_names: list[str], security: ServerSecurity) -> None:
    pool = descriptor_pool.Default()
    missing = [
        f"/{name}/{method.name}"
        for name in service_names
        for method in pool.FindServiceByName(name).methods
        if f"/{name}/{method.name}" not in security.rules
    ]
    if missing:
        raise RuntimeError(f"RPCs without a permission rule (services.common.rpc_policy): {missing}")


def _probe_server(health: HealthServicer, listen: str) -> grpc.aio.Server | None:
    """A plaintext server answering only grpc.health.v1 on ``listen``: the kubelet's grpc probe
    presents no client certificate, and health states nothing a caller could use."""
    if not listen:
        return None
    server = grpc.aio.server(options=SERVER_OPTIONS)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if server.add_insecure_port(listen) == 0:
        raise RuntimeError(f"could not listen on {listen}")
    return server


def channel(addr: str, *, tls: Tls | None, peer: str) -> grpc.aio.Channel:
    """A client channel to ``host:port``, re-resolved by DNS so new replicas join the rotation.

    With ``tls`` it presents this process's certificate, renewed ones included (read from files, it
    is a :class:`RenewingChannel`), and accepts only a server whose certificate names ``peer`` (the
    identity of the service at ``addr``); ``tls=None`` is plaintext (local development only).
    """
    target = addr if "://" in addr or addr.startswith("dns:") else f"dns:///{addr}"
    interceptors = tracing.client_interceptors() or None
    if tls is None:
        return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS, interceptors=interceptors)
    options = [*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", server_name(peer))]

    def secure(current: Tls) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(
            target, current.channel_credentials(), options=options, interceptors=interceptors
        )

    if tls.directory is None:
        return secure(tls)
    # Read from files that a renewal replaces: later calls present the renewed certificate.
    return RenewingChannel(tls, secure, clock=time.monotonic)


async def call(method: grpc.aio.UnaryUnaryMultiCallable[Req, Resp], request: Req, *, timeout: float) -> Resp:
    """Invoke a unary RPC with a deadline, raising :class:`GatewayError` for any failure."""
    try:
        return await method(request, timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        raise rpc_error(exc) from exc
    except grpc.aio.UsageError as exc:
        # The channel was closed under us: this process is shutting down.
        raise ServiceUnavailable("A gateway component is shutting down.") from exc


_REFUSED_CALLER = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})


def rpc_error(exc: grpc.aio.AioRpcError) -> GatewayError:
    """The :class:`GatewayError` for a failed call: the peer's own error when it sent one, else a
    503 with ``Retry-After`` for a peer that is down, draining or restarting, and a 500 when the peer
    refused this process's certificate (a deployment error, never the client's fault)."""
    code = exc.code()
    metadata = {str(k): str(v) for k, v in (exc.trailing_metadata() or ())}  # type: ignore[misc,has-type]
    if code in PEER_UNAVAILABLE and ERROR_CODE_KEY not in metadata:
        return ServiceUnavailable(f"A gateway component is unavailable ({code.name.lower()}).")
    if code in _REFUSED_CALLER and ERROR_CODE_KEY not in metadata:
        # This process's own certificate was refused (services.common.rpc_auth): a deployment error,
        # never its client's fault.
        log.error("internal call refused: %s", exc.details())
        return GatewayError(f"An internal call was refused ({code.name.lower()}).")
    return from_wire(code, exc.details() or "", metadata)
