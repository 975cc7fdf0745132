"""Child processes on loopback: free ports, spawning into a log file, waiting until ready, stopping.

Every child runs in a session of its own, so terminal signals (Ctrl-C) reach only the parent, which
stops its children in order, and a signal sent to the child's process group reaches its whole tree.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

__all__ = [
    "LOOPBACK",
    "InfraError",
    "ManagedProcess",
    "StartError",
    "free_port",
    "free_ports",
    "log_tail",
    "port_accepts",
    "wait_until",
]

LOOPBACK = "127.0.0.1"
POLL_INTERVAL_S = 0.02
STOP_GRACE_S = 20.0


class InfraError(RuntimeError):
    """A development server could not be set up, started or reached."""


class StartError(InfraError):
    """A process exited, or did not become ready in time; the message carries the end of its log."""


# Every port :func:`free_ports` has returned in this process (test infrastructure: one per process).
_HANDED_OUT: set[int] = set()


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that were free a moment ago, none handed out before by this
    process.

    Every socket stays bound until all are chosen: the kernel may hand a port out again once its socket
    is closed, so choosing them one at a time could return the same port twice. For the same reason a
    port chosen by an earlier call (a test's metrics listener, say, not yet bound by its process) could
    come back in a later one (the stack's own ports): those are skipped, their sockets kept bound
    meanwhile so the kernel moves on.
    """
    chosen: list[int] = []
    with contextlib.ExitStack() as stack:
        while len(chosen) < count:
            sock = stack.enter_context(socket.socket())
            sock.bind((LOOPBACK, 0))
            port = int(sock.getsockname()[1])
            if port not in _HANDED_OUT:
                chosen.append(port)
    _HANDED_OUT.update(chosen)
    return chosen


def free_port() -> int:
    return free_ports(1)[0]


def port_accepts(port: int, timeout: float = 0.2) -> bool:
    """Whether something accepts TCP connections on ``127.0.0.1:port``."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout):
            return True
    except OSError:
        return False


def log_tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file, for error messages; never raises."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log at {path}: {exc.strerror})"
    tail = "\n".join(text.rstrip("\n").splitlines()[-lines:])
    return f"--- last lines of {path} ---\n{tail}"


def wait_until(predicate: Callable[[], bool], *, timeout: float, what: str) -> None:
    """Call ``predicate`` until it returns true; ``TimeoutError`` naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(POLL_INTERVAL_S)


class ManagedProcess:
    """One child process, started at construction, its stdout and stderr appended to ``log_path``;
    ``port`` is where it will listen, when it is a server (0 when not known or not one).

    The ``wait_*`` methods return once the child is ready and raise :class:`StartError` (with the end
    of its log) when it exits first or the timeout passes, leaving a child that is still running to the
    caller's :meth:`stop`. :meth:`send` and :meth:`stop` never raise.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        port: int = 0,
    ) -> None:
        self.name = name
        self.port = port
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            # Where this start's output begins: a restarted child appends to the same file.
            self._log_offset = log.tell()
            self.popen = subprocess.Popen(
                list(argv),
                cwd=cwd,
                env=dict(env if env is not None else os.environ),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def wait_listening(self, port: int | None = None, *, timeout: float) -> None:
        """Wait until the child (or anything) accepts connections on ``127.0.0.1:port`` (default: its
        own :attr:`port`)."""
        port = port or self.port
        self._wait(lambda: port_accepts(port), timeout, f"listening on {LOOPBACK}:{port}")

    def wait_for_output(self, text: str, timeout: float) -> None:
        """Wait until this start of the child has written ``text`` to its log."""
        self._wait(lambda: text in self.output(), timeout, f"printing {text!r}")

    def output(self) -> str:
        """What the child wrote since it was started (not what earlier starts appended)."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def _wait(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if self.popen.poll() is not None:
                raise StartError(
                    f"{self.name} exited with code {self.popen.returncode} before {what}\n" + self.log_tail()
                )
            if time.monotonic() > deadline:
                raise StartError(f"{self.name} not {what} within {timeout:g}s\n" + self.log_tail())
            time.sleep(POLL_INTERVAL_S)

    def send(self, sig: signal.Signals, timeout: float = STOP_GRACE_S) -> int:
        """Send ``sig`` to the child's process group and wait for its exit; SIGKILL after ``timeout``.

        Returns the exit code (negative: the signal that ended it).
        """
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        return self.popen.returncode

    def stop(self, grace: float = STOP_GRACE_S) -> int:
        """SIGTERM, then SIGKILL if the child is still there after ``grace`` seconds; the exit code."""
        return self.send(signal.SIGTERM, grace)

    def kill(self) -> int:
        """SIGKILL, like a crash: nothing is flushed or handed over."""
        return self.send(signal.SIGKILL)

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.log_path, lines)
