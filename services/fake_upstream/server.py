"""Serving the fake upstream with uvicorn: in a background thread (:class:`FakeUpstream`) or in the
foreground of a process (:func:`serve`, used by ``python -m services.fake_upstream``).

Both bind the listening socket themselves before uvicorn starts, so the port is known immediately
(port 0 picks a free one) and there is no window in which a client could race the bind. Only
loopback addresses are accepted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import signal
import socket
import threading
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any, Self, TypeVar

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .app import TRANSPORT_EXTENSION, FakeUpstreamApp
from .behaviour import Behaviour
from .stats import StatsSnapshot

T = TypeVar("T")

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


class TransportExposingProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus the connection's transport in every request scope.

    ASGI has no way to close a connection without a response; the fake upstream needs exactly that
    to imitate a provider dropping connections (see :data:`.app.TRANSPORT_EXTENSION`).
    """

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = {TRANSPORT_EXTENSION: {"transport": self.transport}}


class _Server(uvicorn.Server):
    """uvicorn's server, releasing the app's artificial waits at shutdown and reporting readiness."""

    def __init__(self, config: uvicorn.Config, app: FakeUpstreamApp, on_started: Callable[[], None]) -> None:
        super().__init__(config)
        self._fake_app = app
        self._on_started = on_started
        self.loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.loop = asyncio.get_running_loop()
        if self.started:
            self._on_started()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn waits for in-flight responses; hanging or slow fake responses would never end.
        self._fake_app.begin_shutdown()
        await super().shutdown(sockets)


def _check_loopback(host: str) -> None:
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"the fake upstream only listens on loopback addresses, not {host!r}")


def bind_socket(host: str, port: int) -> socket.socket:
    """A bound (not yet listening) TCP socket on loopback ``host``:``port`` (0 = any free port)."""
    _check_loopback(host)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def make_config(app: FakeUpstreamApp, *, log_config: dict[str, Any] | None = None) -> uvicorn.Config:
    """The uvicorn configuration used for the fake upstream: httptools + uvloop, quiet, no access log.

    ``log_config=None`` leaves the process's logging configuration alone (right for tests); the CLI
    passes uvicorn's default so warnings reach stderr.
    """
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard]
        loop = "asyncio"
    return uvicorn.Config(
        app,
        loop=loop,
        http=TransportExposingProtocol,
        ws="none",
        lifespan="on",
        log_level="warning",
        log_config=log_config,
        access_log=False,
        # A backstop only: the app ends its own waits at shutdown.
        timeout_graceful_shutdown=2,
    )


def url_for(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class FakeUpstream:
    """The fake upstream running in a background thread of this process, for tests.

    ::

        with FakeUpstream(chunks=5) as upstream:
            httpx.post(f"{upstream.base_url}/chat/completions", json=...)
            upstream.configure(fail_status=503, fail_count=1)
            upstream.stats()["requests"]

    ``behaviour`` and ``behaviour_fields`` set the initial behaviour (what :meth:`reset` returns to).
    Control methods run on the server's event loop, so they are safe to call from any thread, sync
    or async test code alike (they block for a moment; the server has its own loop and thread).
    """

    def __init__(
        self,
        behaviour: Behaviour | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        **behaviour_fields: Any,
    ) -> None:
        _check_loopback(host)
        initial = (behaviour or Behaviour()).copy()
        initial.update(behaviour_fields)
        self.app = FakeUpstreamApp(initial)
        self.host = host
        self._requested_port = port
        self._port: int | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the fake upstream is not running")
        return self._port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return url_for(self.host, self.port)

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``, what an OpenAI client takes as its base URL."""
        return f"{self.url}/v1"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> Self:
        """Bind, start serving in a daemon thread and return once connections are accepted."""
        if self._thread is not None:
            raise RuntimeError("the fake upstream is already running")
        sock = bind_socket(self.host, self._requested_port)
        ready = threading.Event()
        server = _Server(make_config(self.app), self.app, ready.set)
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="fake-upstream", daemon=True
        )
        self._server, self._thread = server, thread
        self._port = sock.getsockname()[1]
        thread.start()
        if not ready.wait(START_TIMEOUT_S) or not thread.is_alive():
            self.stop()
            sock.close()
            raise RuntimeError("the fake upstream did not start")
        return self

    def stop(self) -> None:
        """Stop serving: open connections are closed, hanging and delayed requests are cut."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.should_exit = True
        thread.join(STOP_TIMEOUT_S)
        if thread.is_alive():
            server.force_exit = True
            thread.join(STOP_TIMEOUT_S)
        self._server = self._thread = None
        self._port = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def behaviour(self) -> Behaviour:
        """A copy of the current behaviour."""
        return self._call(self.app.behaviour.copy)

    def configure(self, **fields: Any) -> Behaviour:
        """Change behaviour fields atomically (raises :class:`.BehaviourError`); returns the result."""
        return self._call(lambda: self.app.configure(fields))

    def reset(self) -> Behaviour:
        """Back to the initial behaviour, with zeroed counters."""
        return self._call(self.app.reset)

    def stats(self) -> StatsSnapshot:
        """A snapshot of the counters (see :class:`.StatsSnapshot`)."""
        return self._call(self.app.snapshot)

    def _call(self, function: Callable[[], T]) -> T:
        server = self._server
        loop = None if server is None else server.loop
        if loop is None or not loop.is_running():
            return function()  # not serving: nothing else touches the app
        if threading.current_thread() is self._thread:
            return function()
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(function())
            except BaseException as error:
                future.set_exception(error)

        loop.call_soon_threadsafe(run)
        return future.result(timeout=STOP_TIMEOUT_S)


def serve(
    behaviour: Behaviour | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    on_started: Callable[[str], None] | None = None,
) -> None:
    """Serve in the foreground until SIGTERM or SIGINT, then shut down gracefully and return.

    ``on_started`` receives the base URL (``http://HOST:PORT``) once connections are accepted.
    """
    app = FakeUpstreamApp(behaviour)
    sock = bind_socket(host, port)
    url = url_for(host, sock.getsockname()[1])
    server = _Server(
        make_config(app, log_config=uvicorn.config.LOGGING_CONFIG),
        app,
        (lambda: on_started(url)) if on_started is not None else (lambda: None),
    )

    def request_stop(_signum: int, _frame: FrameType | None) -> None:
        server.should_exit = True

    # uvicorn swaps in its own handlers while serving and re-raises the captured signal on the
    # previous handler afterwards; with the default handlers that would kill the process (SIGTERM)
    # or raise KeyboardInterrupt (SIGINT) after a clean shutdown. These handlers also cover signals
    # arriving before uvicorn installs its own.
    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
