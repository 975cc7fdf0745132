"""The relay's HTTP/1.1 connections: uvicorn's httptools protocol with the limits it lacks.

uvicorn (0.55, httptools) bounds neither the size nor the number of request headers, nor the time a
client may take to send them or the body: a connection trickling one byte a second, or a header of a
hundred megabytes, is held and buffered for as long as the client likes. Requests that do not parse
get a plain-text 400. :class:`GuardedHttpToolsProtocol` adds, per connection:

* a head deadline (``header_timeout_s`` from connecting, or from the first byte of a following
  request on a kept-alive connection) and a body deadline (``body_timeout_s`` from the end of the
  head): past either, ``408`` and the connection is closed;
* at most ``max_header_bytes`` of request line and headers and ``max_header_count`` headers: ``431``;
* JSON in the caller's error shape for every refusal made here, unparseable requests included (an
  unknown method is ``405`` with ``allow``): Anthropic's for a POST to ``/v1/messages``, OpenAI's
  elsewhere.

It also starts each request's clock (:data:`ARRIVED` in the scope's state) when its head is
complete: the time the request then waits for its handler (behind a pipelined request, or for a
busy event loop) is the gateway's, clients wait it too, and the records and the performance view
count it.

The checks run in the protocol callbacks, before the ASGI app sees the request; nothing here touches
an upstream or a balance.
"""

from __future__ import annotations

import asyncio
import http
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from services.common.errors import GatewayError, InvalidRequest
from services.relay.edge.http.openai_errors import (
    HeadersTooLarge,
    MethodNotAllowed,
    RequestTimeout,
    error_body,
)
from services.relay.formats.anthropic_errors import anthropic_error

__all__ = ["ARRIVED", "ConnectionLimits", "GuardedHttpToolsProtocol", "guarded_protocol"]

# The key, in the scope's state, of the request's arrival (``time.perf_counter()``).
ARRIVED = "relaygate.arrived"
# POSTs to these paths speak Anthropic's Messages API, refusals included.
_ANTHROPIC_PATHS = frozenset({b"/v1/messages", b"/v1/messages/count_tokens"})
# The start of a request kept while its head is read: enough for the method and those paths.
_LINE_START_BYTES = 64

# After a refusal the connection is half-closed and what the client still sends is read and dropped
# for this long: closing with unread data would reset the connection, and the client could lose the
# answer before reading it.
_LINGER_S = 2.0

# Every method the relay routes somewhere; told to a client whose method the parser does not know.
SERVED_METHODS = "GET, POST, PUT, PATCH, DELETE"


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    max_header_bytes: int
    max_header_count: int
    header_timeout_s: float
    body_timeout_s: float


class _Refused(Exception):
    """Raised from a parser callback to stop parsing; the refusal itself is on the protocol."""


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """One client connection; see the module docstring. ``limits`` is set by :func:`guarded_protocol`."""

    limits: ClassVar[ConnectionLimits]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Between the end of one request and the end of the next one's head.
        self._reading_head = True
        self._head_bytes = 0
        self._header_count = 0
        self._deadline: asyncio.TimerHandle | None = None
        self._refusal: GatewayError | None = None
        self._lingering = False
        # The first bytes of the request whose head is being read (see _speaks_anthropic).
        self._line_start = b""
        self._keeping_line = True

    # --- connection events ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.limits.header_timeout_s, head=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        self._unset_keepalive_if_required()
        if self._keeping_line and len(self._line_start) < _LINE_START_BYTES:
            self._line_start += data[: _LINE_START_BYTES - len(self._line_start)]
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserInvalidMethodError:
            self._refuse(
                MethodNotAllowed(f"This server does not implement that method; it serves {SERVED_METHODS}."),
                allow=SERVED_METHODS,
            )
            return
        except httptools.HttpParserUpgrade:
            # No protocol upgrades are served: the request goes on as plain HTTP, as in uvicorn.
            self._unsupported_upgrade_warning()
        except httptools.HttpParserError as exc:
            self._refuse(self._refusal or InvalidRequest(f"The request is not valid HTTP/1.1: {exc}."))
            return
        if self._reading_head and self.parser is not None:
            # The whole segment belongs to a head that is still incomplete.
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_header_bytes:
                self._refuse(self._too_large())

    def send_400_response(self, msg: str) -> None:
        # uvicorn's own path for unparseable requests (kept for any caller that still reaches it).
        self._refuse(InvalidRequest(f"The request is not valid HTTP/1.1: {msg}"))

    # --- parser callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading_head = True
        self._head_bytes = 0
        self._header_count = 0
        if self._deadline is None:
            self._arm(self.limits.header_timeout_s, head=True)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.limits.max_header_count:
            self._refusal = self._too_large()
            raise _Refused
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        # uvicorn parses the request target here (and may refuse it): until that succeeded, the
        # request is still this connection's unanswered head.
        super().on_headers_complete()
        self.scope["state"][ARRIVED] = time.perf_counter()
        self._reading_head = False
        self._keeping_line = False
        self._arm(self.limits.body_timeout_s, head=False)

    def on_message_complete(self) -> None:
        # The next request starts with the next segment (a pipelined one already inside this segment
        # is not kept: its refusal, if any, is in OpenAI's shape).
        self._line_start = b""
        self._keeping_line = True
        self._disarm()
        super().on_message_complete()

    # --- refusals --------------------------------------------------------------------------------

    def _too_large(self) -> HeadersTooLarge:
        limits = self.limits
        return HeadersTooLarge(
            f"The request headers exceed {limits.max_header_bytes} bytes or {limits.max_header_count} fields."
        )

    def _arm(self, timeout_s: float, *, head: bool) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(timeout_s, self._expire, head)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self, head: bool) -> None:
        self._deadline = None
        part, timeout_s = (
            ("head", self.limits.header_timeout_s) if head else ("body", self.limits.body_timeout_s)
        )
        self._refuse(RequestTimeout(f"The request {part} was not received within {timeout_s:g} s."))

    def _refuse(self, exc: GatewayError, *, allow: str = "") -> None:
        """Answer ``exc`` when no other response is under way on this connection, then close it."""
        self._disarm()
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        cycle = self.cycle
        if self._reading_head:
            # ``cycle`` is the previous request's: its response must not be interleaved with ours.
            answer = cycle is None or cycle.response_complete
        else:
            # A queued pipelined request would answer ahead of the response still being sent.
            answer = cycle is not None and not cycle.response_started and not self.pipeline
            if answer:
                # The app's receive() now reports a disconnect, and whatever it sends is dropped.
                cycle.disconnected = True
                cycle.message_event.set()
        if not answer:
            transport.close()
            return
        transport.write(_response(exc, allow, anthropic=self._speaks_anthropic()))
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self._lingering = True
        self.loop.call_later(_LINGER_S, transport.close)

    def _speaks_anthropic(self) -> bool:
        """Whether the refused request is a POST to the Messages API, whose callers read Anthropic's
        errors (once the target is read, the method before it is known)."""
        parser: httptools.HttpRequestParser | None = self.parser
        # uvicorn sets ``url`` as the parser reads the target; a target the parser refused (a raw
        # non-ASCII byte in the query) never reaches it, so the request line is read from its bytes.
        url: bytes = getattr(self, "url", b"")
        if url and parser is not None:
            method = parser.get_method()
        else:
            method, _, rest = self._line_start.partition(b" ")
            url = rest.split(b" ", 1)[0]
        return method == b"POST" and url.split(b"?", 1)[0] in _ANTHROPIC_PATHS


def _response(exc: GatewayError, allow: str, *, anthropic: bool) -> bytes:
    if anthropic:
        status, payload = anthropic_error(exc)
        body, headers = orjson.dumps(payload), [(b"content-type", b"application/json")]
    else:
        status, body, headers = error_body(exc)
    if allow:
        headers.append((b"allow", allow.encode()))
    headers += [(b"content-length", b"%d" % len(body)), (b"connection", b"close")]
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, http.HTTPStatus(status).phrase.encode())]
    lines += [name + b": " + value + b"\r\n" for name, value in headers]
    return b"".join([*lines, b"\r\n", body])


def guarded_protocol(limits: ConnectionLimits) -> type[GuardedHttpToolsProtocol]:
    """The protocol class for uvicorn's ``http=``, bound to ``limits`` (uvicorn instantiates it)."""
    return type("RelayHttpProtocol", (GuardedHttpToolsProtocol,), {"limits": limits})
