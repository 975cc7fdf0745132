"""The fake upstream as a plain ASGI application (no framework on the hot path).

Inference paths belong to a provider :class:`.Dialect`: OpenAI (``/v1/...``), Azure OpenAI
(``/openai/deployments/...``), Anthropic (``/v1/messages``) and Gemini (``/v1beta/models/...``).
Request flow, the same for each:

1. route by path (404 ``unknown_url``) and method (405 with ``allow``);
2. read the body, parse it with orjson, record it in :class:`.Stats`;
3. check credentials and required headers the dialect's way (its 401/403/400/404);
4. wait ``latency_ms``;
5. inject the failure chosen by :meth:`.Behaviour.take_failure`, if any (in the dialect's shape);
6. answer 400 for a body that is not a JSON object, else run the endpoint handler.

Dropping a connection needs the TCP transport, which ASGI does not expose: the runner in
:mod:`.server` installs an HTTP protocol that publishes it in ``scope["extensions"]`` under
:data:`TRANSPORT_EXTENSION`. Served by any other ASGI server, a drop degrades to starting a response
and raising, which makes the server abort that response (a broken body rather than no response).

Control paths under ``/_fake/``:

* ``GET /_fake/behaviour`` - the current behaviour;
* ``POST /_fake/behaviour`` - JSON object of fields to change; answers the full behaviour, or 400
  naming the bad field (``param``) with nothing changed;
* ``POST /_fake/reset`` - behaviour back to the one the app was created with, counters zeroed;
  answers the behaviour;
* ``GET /_fake/stats`` - :class:`.StatsSnapshot`;
* ``GET /_fake/health`` - ``{"status": "ok"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

import orjson

from . import anthropic_api, azure_api, gemini_api, openai_api
from .behaviour import Behaviour, BehaviourError, Failure
from .dialect import Call, Dialect, Route, Streams, headers_of, query_of
from .endpoints import SSE_HEADERS, JsonReply, RequestError, StreamReply
from .pacing import Pacer, ShuttingDown
from .stats import Stats, StatsSnapshot

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

TRANSPORT_EXTENSION = "relaygate.fake_upstream.transport"
"""``scope["extensions"][TRANSPORT_EXTENSION]["transport"]`` is the connection's asyncio transport."""

CONTROL_PREFIX = "/_fake/"

_DIALECTS: tuple[Dialect, ...] = (
    openai_api.DIALECT,
    anthropic_api.DIALECT,
    azure_api.DIALECT,
    gemini_api.DIALECT,
)


def _route(path: str) -> tuple[Dialect, Route] | None:
    for dialect in _DIALECTS:
        route = dialect.match(path)
        if route is not None:
            return dialect, route
    return None


class FakeUpstreamApp:
    """ASGI application of the fake upstream.

    ``behaviour`` and ``stats`` are meant to be read and changed from the serving event loop only;
    :class:`.server.FakeUpstream` marshals calls from other threads onto it.
    """

    def __init__(self, behaviour: Behaviour | None = None) -> None:
        self._initial = (behaviour or Behaviour()).copy()
        self.behaviour = self._initial.copy()
        self.stats = Stats()
        self.pacer = Pacer()
        self._control: dict[str, dict[str, Callable[[Any], JsonReply]]] = {
            "/_fake/behaviour": {"GET": self._get_behaviour, "POST": self._post_behaviour},
            "/_fake/reset": {"POST": self._post_reset},
            "/_fake/stats": {"GET": self._get_stats},
            "/_fake/health": {"GET": _get_health},
        }

    # Runtime control, shared by the control endpoints and the in-process runner.

    def configure(self, changes: dict[str, Any]) -> Behaviour:
        """Apply behaviour ``changes`` atomically (raises :class:`.BehaviourError`); returns a copy."""
        self.behaviour.update(changes)
        return self.behaviour.copy()

    def reset(self) -> Behaviour:
        """Restore the initial behaviour and zero the counters; returns a copy of the behaviour."""
        self.behaviour = self._initial.copy()
        self.stats.reset()
        return self.behaviour.copy()

    def snapshot(self) -> StatsSnapshot:
        return self.stats.snapshot()

    def begin_shutdown(self) -> None:
        """End every artificial wait (latency, pacing, hang) so a server shutdown is not held open."""
        self.pacer.close()

    # ASGI entry point.

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.pacer.open()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.pacer.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        routed = _route(path)
        if routed is not None:
            dialect, route = routed
            if method != route.method:
                allow = ((b"allow", route.method.encode()),)
                await _send_json(send, dialect.error(_method_not_allowed(method, path)), allow)
                return
            try:
                await self._inference(scope, receive, send, dialect, route)
            except ShuttingDown:
                await _drop(scope, receive, send)
            return
        control = self._control.get(path)
        if control is None:
            await _send_json(send, _unknown_url(method, path).reply())
            return
        action = control.get(method)
        if action is None:
            allowed = ", ".join(control).encode()
            await _send_json(send, _method_not_allowed(method, path).reply(), ((b"allow", allowed),))
            return
        raw = await _read_body(receive)
        if raw is None:
            return
        body: Any = None
        if method == "POST" and raw.strip():
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                await _send_json(send, _invalid_json().reply())
                return
        await _send_json(send, action(body))

    async def _inference(
        self, scope: Scope, receive: Receive, send: Send, dialect: Dialect, route: Route
    ) -> None:
        raw = await _read_body(receive)
        if raw is None:
            return
        body: Any = None
        valid = True
        if scope["method"] == "POST":
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                valid = False
            else:
                valid = isinstance(body, dict)
        self.stats.record(scope["method"], scope["path"], scope["headers"], body)

        behaviour = self.behaviour
        call = Call(body, route.params, query_of(scope["query_string"]), headers_of(scope["headers"]))
        refusal = dialect.refuse(call, behaviour)
        if refusal is not None:
            await _send_json(send, refusal)
            return
        if behaviour.latency_ms > 0:
            await self.pacer.sleep(behaviour.latency_ms / 1000)
            behaviour = self.behaviour  # may have been reconfigured while we slept

        failure: Failure | None = None
        if behaviour.failing:
            streaming = route.streams is Streams.ALWAYS or (
                route.streams is Streams.ON_REQUEST and valid and body.get("stream") is True
            )
            failure = behaviour.take_failure(streaming=streaming)
            if failure is not None:
                self.stats.injected_failures += 1
                if failure is Failure.DROP_CONNECTION:
                    await _drop(scope, receive, send)
                    return
                if failure is Failure.HANG:
                    await self.pacer.wait_for(_until_disconnect(receive))
                    return
                if failure is Failure.STATUS:
                    await _send_json(send, dialect.injected(behaviour.fail_status or 500, behaviour))
                    return

        if not valid:
            await _send_json(send, dialect.error(_invalid_json()))
            return
        try:
            reply = route.handler(call, behaviour)
        except RequestError as error:
            reply = dialect.error(error)
        if isinstance(reply, StreamReply):
            drop_after = behaviour.drop_after_chunks if failure is Failure.DROP_MID_STREAM else None
            await self._stream(scope, receive, send, reply, behaviour.chunk_interval_ms / 1000, drop_after)
        else:
            await _send_json(send, reply)

    async def _stream(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        reply: StreamReply,
        interval: float,
        drop_after: int | None,
    ) -> None:
        """Send ``reply.events``, pacing content chunks; with ``drop_after``, cut the connection after
        that many events (never reaching the terminating chunk or ``[DONE]``)."""
        stats = self.stats
        events = reply.events
        stats.open_streams += 1
        completed = False
        try:
            await send({"type": "http.response.start", "status": 200, "headers": reply.headers})
            if interval <= 0 and drop_after is None:
                # Nothing to pace: one write is much cheaper than one per event, and SSE framing
                # does not depend on how the bytes are split.
                await send({"type": "http.response.body", "body": b"".join(events), "more_body": False})
                completed = True
                return
            transport = _transport(scope)
            last = len(events) - 1
            count = len(events) if drop_after is None else min(drop_after, last)
            content = reply.content
            for index in range(count):
                if interval > 0 and index in content:
                    await self.pacer.sleep(interval)
                if transport is not None and transport.is_closing():
                    return  # the client went away
                more = drop_after is not None or index < last
                await send({"type": "http.response.body", "body": events[index], "more_body": more})
            if drop_after is not None:
                await _drop(scope, receive, send)
                return
            completed = transport is None or not transport.is_closing()
        except ShuttingDown:
            await _drop(scope, receive, send)
        finally:
            stats.open_streams -= 1
            if completed:
                stats.completed_streams += 1
            else:
                stats.aborted_streams += 1

    # Control endpoints.

    def _get_behaviour(self, _body: Any) -> JsonReply:
        return JsonReply(orjson.dumps(self.behaviour.to_dict()))

    def _post_behaviour(self, body: Any) -> JsonReply:
        if not isinstance(body, dict):
            return RequestError(
                400, "body must be a JSON object of behaviour fields", code="invalid_json"
            ).reply()
        try:
            self.configure(body)
        except BehaviourError as error:
            return RequestError(400, str(error), param=error.field_name, code="invalid_value").reply()
        return self._get_behaviour(None)

    def _post_reset(self, _body: Any) -> JsonReply:
        self.reset()
        return self._get_behaviour(None)

    def _get_stats(self, _body: Any) -> JsonReply:
        return JsonReply(orjson.dumps(self.stats.snapshot()))


_HEALTH = JsonReply(b'{"status":"ok"}')


def _get_health(_body: Any) -> JsonReply:
    return _HEALTH


def _unknown_url(method: str, path: str) -> RequestError:
    return RequestError(404, f"Invalid URL ({method} {path})", code="unknown_url")


def _method_not_allowed(method: str, path: str) -> RequestError:
    return RequestError(405, f"Method {method} not allowed for {path}", code="method_not_allowed")


def _invalid_json() -> RequestError:
    return RequestError(
        400,
        "We could not parse the JSON body of your request: it must be a JSON object.",
        code="invalid_json",
    )


async def _send_json(send: Send, reply: JsonReply, extra: Sequence[tuple[bytes, bytes]] = ()) -> None:
    body = reply.body
    headers = [*reply.headers, *extra, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or ``None`` if the client disconnected first."""
    message = await receive()
    if message["type"] != "http.request":
        return None
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return body
    parts = [body]
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _transport(scope: Scope) -> asyncio.Transport | None:
    extension = scope.get("extensions", {}).get(TRANSPORT_EXTENSION)
    return None if extension is None else extension.get("transport")


class _DroppedConnection(Exception):
    """Raised to make a foreign ASGI server abort the response when the transport is not exposed."""


async def _drop(scope: Scope, receive: Receive, send: Send) -> None:
    """Close the client connection without completing (or starting) a response.

    ``close()`` rather than ``abort()``: it still flushes bytes already written, so a client
    reliably receives every chunk sent before a mid-stream drop, followed by a FIN.
    """
    transport = _transport(scope)
    if transport is None:
        with contextlib.suppress(RuntimeError):  # the response may have started already
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        raise _DroppedConnection("connection dropped on purpose")
    transport.close()
    # Returning before the server has seen the connection go would make it complain about (or try
    # to answer) an unfinished response; the disconnect arrives on the next event-loop turns.
    await _until_disconnect(receive)
