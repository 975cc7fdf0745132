"""uvicorn's server with the relay's way out: the signal logged, the HTTP drain and the lifespan's
shutdown timed and bounded, and a backstop that ends the process with every thread's stack in its log.

uvicorn on SIGTERM stops listening, asks every connection to close once its response is sent, waits
for them (``timeout_graceful_shutdown``), then runs the lifespan's shutdown and waits for it without
any deadline: one request whose client never finishes its body, or one close that never returns,
keeps the process alive until it is killed, and a SIGKILL leaves nothing in the log to say why.

Here the drain gets ``drain_s``; the connections still open then are closed and their requests
cancelled (a cancelled request gives its hold back, see ``routes.relay``). The whole way out gets
``timeout_s``: the lifespan's shutdown is given what is left of it (the tasks it still waits for are
logged when it overruns), and a watchdog thread, armed when the signal is noticed, writes every
thread's stack to the log and ends the process at ``timeout_s`` even when the event loop itself is
blocked.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import signal
import socket
import time
from types import FrameType

import uvicorn

from services.relay.edge.http.shutdown import SHUTDOWN_CLOCK, ShutdownClock, timed_step

__all__ = ["RelayServer"]

log = logging.getLogger(__name__)

# How often the drain checks whether the connections are gone (uvicorn: 0.1 s).
_POLL_S = 0.05
# What cancelled requests get to run their cleanup (give their holds back) before the lifespan's
# steps close what they use.
_CANCELLED_S = 1.0
# The lifespan's deadline comes this long before the watchdog's, so that an overrun is reported by
# the event loop (which tasks were pending) rather than only by the watchdog (thread stacks).
_REPORT_S = 1.0


class RelayServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, *, drain_s: float, timeout_s: float) -> None:
        super().__init__(config)
        self._drain_s = drain_s
        self._timeout_s = timeout_s
        self._signal: int | None = None
        self._signalled_at: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs in the signal handler: only note it (logging here could re-enter a write in progress).
        if self._signal is None:
            self._signal, self._signalled_at = sig, time.perf_counter()
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        started = self._signalled_at or time.perf_counter()
        # On a thread of its own: it fires even when the event loop never gets back to us.
        faulthandler.dump_traceback_later(
            max(self._timeout_s - _ms_since(started) / 1000, _REPORT_S), exit=True
        )
        try:
            state = self.server_state
            log.info(
                "shutdown started",
                extra={
                    "signal": signal.Signals(self._signal).name if self._signal is not None else "",
                    # How long the loop took to notice: a blocked event loop shows here.
                    "noticed_ms": _ms_since(started),
                    "connections": len(state.connections),
                    "requests": len(state.tasks),
                    "timeout_ms": round(self._timeout_s * 1000),
                },
            )
            self._start_clock(started)
            await self._drain_http(sockets)
            if not self.force_exit:
                await self._stop_lifespan(self._timeout_s - _ms_since(started) / 1000 - _REPORT_S)
            log.info("shutdown complete", extra={"ms": _ms_since(started)})
        finally:
            faulthandler.cancel_dump_traceback_later()

    def _start_clock(self, started: float) -> None:
        """Tell the lifespan's steps when the way out must be over (they keep to it, the publisher's
        time reserved), a little before the lifespan's own deadline below."""
        clock = self.lifespan.state.get(SHUTDOWN_CLOCK) if hasattr(self, "lifespan") else None
        if isinstance(clock, ShutdownClock):
            left_s = self._timeout_s - (time.perf_counter() - started) - 2 * _REPORT_S
            clock.ends_at = time.monotonic() + left_s

    async def _drain_http(self, sockets: list[socket.socket] | None) -> None:
        """Stop listening, let in-flight requests finish (``drain_s``), then close whatever is still
        open and cancel its requests."""
        state = self.server_state
        with timed_step("http_drain", connections=len(state.connections), requests=len(state.tasks)) as found:
            for server in self.servers:
                server.close()
            for sock in sockets or []:
                sock.close()
            for connection in list(state.connections):
                connection.shutdown()
            deadline = time.monotonic() + self._drain_s
            while (state.connections or state.tasks) and not self.force_exit:
                if time.monotonic() >= deadline:
                    found["outcome"] = "timed_out"
                    break
                await asyncio.sleep(_POLL_S)
            found["left"] = len(state.connections)
            found["cancelled"] = len(state.tasks)
            cancelled = list(state.tasks)
            for task in cancelled:
                task.cancel()
            for connection in list(state.connections):
                # Abort, not close: close would first flush what a client that stopped reading never
                # takes.
                transport = getattr(connection, "transport", None)
                if transport is not None:
                    transport.abort()
            if cancelled:
                await asyncio.wait(cancelled, timeout=_CANCELLED_S)
            for server in self.servers:
                await server.wait_closed()

    async def _stop_lifespan(self, left_s: float) -> None:
        with timed_step("lifespan", deadline_ms=round(left_s * 1000)) as found:
            try:
                async with asyncio.timeout(max(left_s, 0.0)):
                    await self.lifespan.shutdown()
            except TimeoutError:
                found["outcome"] = "timed_out"
                found["pending"] = _pending_tasks()


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)


def _pending_tasks() -> list[str]:
    """The tasks still running, each with the chain of coroutines it waits in: what a shutdown that
    overran waited for."""
    current = asyncio.current_task()
    return sorted(
        f"{task.get_name()}: {_awaiting(task)}"
        for task in asyncio.all_tasks()
        if task is not current and not task.done()
    )


def _awaiting(task: asyncio.Task[object]) -> str:
    # A suspended task's stack is one frame; the coroutines it awaits hang off cr_await.
    names: list[str] = []
    where = "?"
    awaited: object = task.get_coro()
    while awaited is not None and len(names) < 12:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
        if frame is not None:
            names.append(frame.f_code.co_qualname)
            where = f"{frame.f_code.co_filename}:{frame.f_lineno}"
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
    return " > ".join(names) + f" ({where})"
