"""The fake upstream as a plain ASGI application (no framework on the hot path).

Request flow for inference paths (everything under ``/v1``):

1. route by exact path (404 ``unknown_url``) and method (405 with ``allow``);
2. read the body, parse it with orjson, record it in :class:`.Stats`;
3. check the bearer token when ``api_key`` is set (401 ``invalid_api_key``);
4. wait ``latency_ms``;
5. inject the failure chosen by :meth:`.Behaviour.take_failure`, if any;
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

from . import endpoints, payloads
from .behaviour import Behaviour, BehaviourError, Failure
from .endpoints import Handler, JsonReply, RequestError, StreamReply
from .pacing import Pacer, ShuttingDown
from .stats import Stats, StatsSnapshot

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

TRANSPORT_EXTENSION = "relaygate.fake_upstream.transport"
"""``scope["extensions"][TRANSPORT_EXTENSION]["transport"]`` is the connection's asyncio transport."""

CONTROL_PREFIX = "/_fake/"

_SSE_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
)

# Inference routes: path -> (the one allowed method, handler).
_INFERENCE: dict[str, tuple[str, Handler]] = {
    "/v1/chat/completions": ("POST", endpoints.chat_completions),
    "/v1/completions": ("POST", endpoints.completions),
    "/v1/embeddings": ("POST", endpoints.embeddings),
    "/v1/images/generations": ("POST", endpoints.image_generations),
    "/v1/models": ("GET", endpoints.list_models),
}

_STREAMING_PATHS = frozenset(("/v1/chat/completions", "/v1/completions"))


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
        route = _INFERENCE.get(path)
        if route is not None:
            allowed, handler = route
            if method != allowed:
                await _send_json(send, _method_not_allowed(method, path), ((b"allow", allowed.encode()),))
                return
            try:
                await self._inference(scope, receive, send, path, handler)
            except ShuttingDown:
                await _drop(scope, receive, send)
            return
        control = self._control.get(path)
        if control is None:
            reply = RequestError(404, f"Invalid URL ({method} {path})", code="unknown_url").reply()
            await _send_json(send, reply)
            return
        action = control.get(method)
        if action is None:
            allow = ", ".join(control).encode()
            await _send_json(send, _method_not_allowed(method, path), ((b"allow", allow),))
            return
        raw = await _read_body(receive)
        if raw is None:
            return
        body: Any = None
        if method == "POST" and raw.strip():
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                await _send_json(send, _invalid_json())
                return
        await _send_json(send, action(body))

    async def _inference(
        self, scope: Scope, receive: Receive, send: Send, path: str, handler: Handler
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
        self.stats.record(scope["method"], path, scope["headers"], body)

        behaviour = self.behaviour
        if behaviour.api_key is not None and not _authorised(scope["headers"], behaviour.api_key):
            await _send_json(send, _unauthorised())
            return
        if behaviour.latency_ms > 0:
            await self.pacer.sleep(behaviour.latency_ms / 1000)
            behaviour = self.behaviour  # may have been reconfigured while we slept

        failure: Failure | None = None
        if behaviour.failing:
            streaming = valid and path in _STREAMING_PATHS and body.get("stream") is True
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
                    await _send_json(send, *_injected_status(behaviour))
                    return

        if not valid:
            await _send_json(send, _invalid_json())
            return
        try:
            reply = handler(body, behaviour)
        except RequestError as error:
            reply = error.reply()
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
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
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


def _method_not_allowed(method: str, path: str) -> JsonReply:
    return RequestError(405, f"Method {method} not allowed for {path}", code="method_not_allowed").reply()


def _invalid_json() -> JsonReply:
    return RequestError(
        400,
        "We could not parse the JSON body of your request: it must be a JSON object.",
        code="invalid_json",
    ).reply()


def _unauthorised() -> JsonReply:
    return RequestError(401, "Incorrect API key provided.", code="invalid_api_key").reply()


def _injected_status(behaviour: Behaviour) -> tuple[JsonReply, tuple[tuple[bytes, bytes], ...]]:
    status = behaviour.fail_status or 500
    extra: tuple[tuple[bytes, bytes], ...] = ()
    if status == 429:
        extra = ((b"retry-after", str(behaviour.retry_after).encode()),)
    return JsonReply(payloads.injected_error(status), status), extra


def _authorised(headers: Sequence[tuple[bytes, bytes]], api_key: str) -> bool:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return scheme.lower() == b"bearer" and token.strip() == api_key.encode()
    return False


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
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        raise _DroppedConnection("connection dropped on purpose")
    transport.close()
    # Returning before the server has seen the connection go would make it complain about (or try
    # to answer) an unfinished response; the disconnect arrives on the next event-loop turns.
    await _until_disconnect(receive)
