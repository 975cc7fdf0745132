"""HTTP/1.1 over a raw socket: requests are sent byte for byte as generated (odd methods, control
bytes in headers, invalid UTF-8), which no HTTP client library would agree to send."""

from __future__ import annotations

import contextlib
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    status: int
    # Lower-cased names; a repeated header keeps its last value.
    headers: dict[str, str]
    body: bytes


class NoReply(AssertionError):
    """The server closed the connection without a complete HTTP response."""


def request_bytes(
    method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes | None
) -> bytes:
    """One request that closes its connection; ``content-length`` is added when there is a body."""
    lines = [method + b" " + target + b" HTTP/1.1", b"host: relay.test"]
    lines += [name + b": " + value for name, value in headers]
    if body is not None:
        lines.append(b"content-length: %d" % len(body))
    lines.append(b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


def exchange(port: int, request: bytes, *, head: bool = False, timeout_s: float = 15.0) -> Reply:
    """Send ``request`` and read the response until the server closes the connection (``head``: the
    request was a HEAD, so the response has no body whatever its headers say)."""
    received = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        # Refused before the whole request was sent: the answer may still be there.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request)
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                received += chunk
    return parse(bytes(received), head=head)


def parse(received: bytes, *, head: bool = False) -> Reply:
    top, separator, body = received.partition(b"\r\n\r\n")
    if not separator:
        raise NoReply(f"no complete response head in {received[:200]!r}")
    status_line, *header_lines = top.decode("latin-1").split("\r\n")
    version, _, rest = status_line.partition(" ")
    if not version.startswith("HTTP/1.") or not rest[:3].isdigit():
        raise NoReply(f"not an HTTP response: {status_line!r}")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if head:
        body = b""
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        body = _dechunk(body)
    elif "content-length" in headers:
        length = int(headers["content-length"])
        if len(body) < length:
            raise NoReply(f"body cut at {len(body)} of {length} bytes")
        body = body[:length]
    return Reply(int(rest[:3]), headers, body)


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while True:
        size_line, separator, data = data.partition(b"\r\n")
        if not separator:
            raise NoReply("chunked body cut short")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += data[:size]
        data = data[size + 2 :]
