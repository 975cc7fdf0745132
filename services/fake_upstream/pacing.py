"""Delays that a server shutdown can cut short.

A fake upstream configured with long latencies or ``hang`` would otherwise hold uvicorn's graceful
shutdown open until every delayed request finished (uvicorn waits for in-flight responses and has
no way to know that ours are artificial). :class:`Pacer` tracks every pending wait so that
:meth:`Pacer.close` can end them all at once with :class:`ShuttingDown`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable


class ShuttingDown(Exception):
    """Raised out of a wait when the server is shutting down."""


class Pacer:
    """Interruptible waits; usable from one event loop at a time (the server's)."""

    def __init__(self) -> None:
        self._pending: set[asyncio.Future[None]] = set()
        self._closed = False

    def open(self) -> None:
        """Accept waits again (a server starting, possibly after an earlier shutdown)."""
        self._closed = False

    def close(self) -> None:
        """Fail every pending and future wait with :class:`ShuttingDown` until :meth:`open`."""
        self._closed = True
        for waiter in self._pending:
            if not waiter.done():
                waiter.set_exception(ShuttingDown())
        self._pending.clear()

    async def sleep(self, seconds: float) -> None:
        """Sleep ``seconds``; raises :class:`ShuttingDown` if the server closes meanwhile."""
        if self._closed:
            raise ShuttingDown
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        timer = loop.call_later(seconds, _wake, waiter)
        self._pending.add(waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._pending.discard(waiter)

    async def wait_for(self, awaitable: Awaitable[object]) -> None:
        """Wait until ``awaitable`` completes; raises :class:`ShuttingDown` if the server closes first."""
        if self._closed:
            raise ShuttingDown
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        task = asyncio.ensure_future(awaitable)
        task.add_done_callback(lambda finished: _settle(finished, waiter))
        self._pending.add(waiter)
        try:
            await waiter
        finally:
            task.cancel()
            self._pending.discard(waiter)


def _settle(task: asyncio.Future[object], waiter: asyncio.Future[None]) -> None:
    # Retrieve the outcome so asyncio never reports an exception as "never retrieved".
    if not task.cancelled():
        task.exception()
    _wake(waiter)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
