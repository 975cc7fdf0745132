"""CPU time and memory of the measured processes, read from ``/proc``.

CPU is counted in clock ticks (``utime + stime`` of ``/proc/<pid>/stat``) and turned into milliseconds
of CPU per unit of work (request, event, reservation pair) by the scenarios. A :class:`Tracked` process
may include its descendants: PostgreSQL forks one backend per connection, so its group is the
postmaster plus its live children, plus the ``cutime + cstime`` the postmaster inherited from children
that exited in between.
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CLOCK_TICKS",
    "CpuWindow",
    "Tracked",
    "cpu_ticks",
    "memory_mb",
    "own_cpu_ms",
    "pid_listening_on",
    "rss_bytes",
]

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PROC = Path("/proc")
_TCP_LISTEN = "0A"


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name (which may contain spaces)."""
    try:
        raw = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def cpu_ticks(pid: int, *, with_reaped_children: bool = False) -> int | None:
    """``utime + stime`` of ``pid`` (plus ``cutime + cstime`` if asked); ``None`` if it is gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    # After the name: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14).
    ticks = int(fields[11]) + int(fields[12])
    if with_reaped_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks


def _status_kb(pid: int, field: str) -> int | None:
    try:
        for line in (_PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def rss_bytes(pid: int) -> int | None:
    """Resident set size (``VmRSS``) of one process."""
    kb = _status_kb(pid, "VmRSS")
    return None if kb is None else kb * 1024


def _pss_bytes(pid: int) -> int | None:
    """Proportional set size: shared pages divided among the processes sharing them."""
    try:
        for line in (_PROC / str(pid) / "smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def _descendants(pid: int, children: Mapping[int, list[int]]) -> list[int]:
    found: list[int] = []
    stack = list(children.get(pid, ()))
    while stack:
        child = stack.pop()
        found.append(child)
        stack.extend(children.get(child, ()))
    return found


def pid_listening_on(port: int) -> int | None:
    """The process holding a listening TCP socket on ``port`` (any local address), if this user sees it."""
    inodes: set[str] = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (_PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9 and parts[3] == _TCP_LISTEN and int(parts[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{parts[9]}]")
    if not inodes:
        return None
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (entry / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in inodes:
                        return int(entry.name)
    return None


@dataclass(frozen=True)
class Tracked:
    """A measured process: one pid, or a pid and everything it forked (``tree=True``)."""

    name: str
    pid: int
    tree: bool = False

    def pids(self, children: Mapping[int, list[int]] | None = None) -> list[int]:
        if not self.tree:
            return [self.pid]
        return [self.pid, *_descendants(self.pid, children if children is not None else _children_map())]

    def ticks(self, children: Mapping[int, list[int]] | None = None) -> int:
        if not self.tree:
            return cpu_ticks(self.pid) or 0
        total = cpu_ticks(self.pid, with_reaped_children=True) or 0
        for pid in self.pids(children)[1:]:
            total += cpu_ticks(pid) or 0
        return total

    def memory_bytes(self) -> int:
        """RSS of a single process; PSS summed over a tree (backends share PostgreSQL's buffers)."""
        if not self.tree:
            return rss_bytes(self.pid) or 0
        return sum(_pss_bytes(pid) or 0 for pid in self.pids())


def own_cpu_ms() -> float:
    """CPU time used so far by this process (all threads), in milliseconds."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return (usage.ru_utime + usage.ru_stime) * 1000


class CpuWindow:
    """CPU milliseconds each tracked process spent between ``__enter__`` and ``__exit__``.

    The harness's own CPU (its in-process clients) is recorded as ``"harness"``.
    """

    def __init__(self, tracked: Iterable[Tracked]) -> None:
        self.tracked = list(tracked)
        self.cpu_ms: dict[str, float] = {}
        self.wall_s = 0.0
        self._start: dict[str, int] = {}
        self._own = 0.0
        self._t0 = 0.0

    def _snapshot(self) -> dict[str, int]:
        children = _children_map() if any(t.tree for t in self.tracked) else {}
        return {t.name: t.ticks(children) for t in self.tracked}

    def __enter__(self) -> CpuWindow:
        self._start = self._snapshot()
        self._own = own_cpu_ms()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_s = time.perf_counter() - self._t0
        end = self._snapshot()
        self.cpu_ms = {name: (end[name] - self._start.get(name, 0)) * 1000 / CLOCK_TICKS for name in end}
        self.cpu_ms["harness"] = own_cpu_ms() - self._own


def memory_mb(tracked: Iterable[Tracked]) -> dict[str, float]:
    """Current memory of each tracked process in MiB (RSS, or PSS for process trees)."""
    return {t.name: round(t.memory_bytes() / 2**20, 1) for t in tracked}
