"""Counters the fake upstream keeps about the traffic it saw, served by ``GET /_fake/stats``.

Only paths outside ``/_fake/`` are counted and remembered: polling the stats must not overwrite the
request a test wants to inspect. Recording is cheap on purpose (a counter bump and two references);
the snapshot does the conversion work.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypedDict


class LastRequest(TypedDict):
    """The most recent request to a non-control path."""

    method: str
    path: str
    headers: dict[str, str]
    """Lower-cased header names; repeated headers are joined with ``", "``."""
    body: Any
    """The parsed JSON body, or ``None`` when it was empty or not valid JSON."""


class StatsSnapshot(TypedDict):
    """A point-in-time copy of :class:`Stats`."""

    requests_total: int
    requests: dict[str, int]
    """Requests per path."""
    open_streams: int
    completed_streams: int
    """Streams sent to their end (OpenAI's ``[DONE]``, Anthropic's ``message_stop``, ...)."""
    aborted_streams: int
    """Streams cut short: ``drop_after_chunks``, client disconnects, server shutdown."""
    injected_failures: int
    last_request: LastRequest | None


class Stats:
    """Mutable counters, updated from the server's event loop only."""

    def __init__(self) -> None:
        self.requests: dict[str, int] = {}
        self.open_streams = 0
        self.completed_streams = 0
        self.aborted_streams = 0
        self.injected_failures = 0
        self._last: tuple[str, str, Sequence[tuple[bytes, bytes]], Any] | None = None

    def record(self, method: str, path: str, headers: Sequence[tuple[bytes, bytes]], body: Any) -> None:
        """Count one request and remember it as the last one."""
        self.requests[path] = self.requests.get(path, 0) + 1
        self._last = (method, path, headers, body)

    def reset(self) -> None:
        """Zero the counters and forget the last request. ``open_streams`` is a live gauge and stays."""
        self.requests = {}
        self.completed_streams = 0
        self.aborted_streams = 0
        self.injected_failures = 0
        self._last = None

    def snapshot(self) -> StatsSnapshot:
        last: LastRequest | None = None
        if self._last is not None:
            method, path, raw_headers, body = self._last
            headers: dict[str, str] = {}
            for raw_name, raw_value in raw_headers:
                name = raw_name.decode("latin-1").lower()
                value = raw_value.decode("latin-1")
                headers[name] = f"{headers[name]}, {value}" if name in headers else value
            last = {"method": method, "path": path, "headers": headers, "body": body}
        return {
            "requests_total": sum(self.requests.values()),
            "requests": dict(self.requests),
            "open_streams": self.open_streams,
            "completed_streams": self.completed_streams,
            "aborted_streams": self.aborted_streams,
            "injected_failures": self.injected_failures,
            "last_request": last,
        }
