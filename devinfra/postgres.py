"""A PostgreSQL primary with a hot-standby replica streaming from it, driven by the command-line tools.

Debian installs the server tools off ``PATH`` (``/usr/lib/postgresql/<major>/bin``); ``$PGBIN`` overrides
the lookup. When run as root, every tool runs as the ``postgres`` OS user through ``runuser``, because
PostgreSQL refuses to run as root. The database superuser is ``postgres`` either way, with trust
authentication on loopback, so the DSNs carry no password.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import signal
import subprocess
from pathlib import Path

from devinfra.processes import LOOPBACK, InfraError, log_tail, wait_until

__all__ = ["PG_TOOLS", "PostgresError", "PostgresPair", "missing_pg_tools", "pg_bin_dir", "pg_dsn", "psql"]

PG_SUPERUSER = "postgres"
PG_TOOLS = ("initdb", "pg_ctl", "pg_basebackup", "psql")

# Appended to the primary's postgresql.conf; the replica inherits them through pg_basebackup.
# fsync and full_page_writes only matter after an OS crash, which a throwaway cluster never survives
# anyway. synchronous_commit must stay on: with it off, WAL reaches the replica only every
# wal_writer_delay (~200 ms lag) and pg_current_wal_lsn() under-reports, so LSN-based waits return early.
_PG_SETTINGS = {
    "listen_addresses": f"'{LOOPBACK}'",
    "wal_level": "replica",
    "max_wal_senders": "4",
    "wal_keep_size": "64MB",
    "hot_standby": "on",
    "fsync": "off",
    "full_page_writes": "off",
    "synchronous_commit": "on",
    "max_connections": "300",
}

_DATABASE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


class PostgresError(InfraError):
    """A PostgreSQL tool failed; the message carries its output."""


def pg_bin_dir() -> Path | None:
    """``$PGBIN`` if set, else the newest ``/usr/lib/postgresql/<major>/bin``, else ``None``."""
    if explicit := os.environ.get("PGBIN"):
        return Path(explicit)
    candidates = [path for path in Path("/usr/lib/postgresql").glob("*/bin") if path.is_dir()]
    return max(candidates, key=_version_key, default=None)


def _version_key(bin_dir: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", bin_dir.parent.name))


def missing_pg_tools() -> list[str]:
    """The PostgreSQL tools (and ``runuser`` when root) that cannot be found; empty when all exist."""
    bin_dir = pg_bin_dir()
    missing = [tool for tool in PG_TOOLS if bin_dir is None or not _is_executable(bin_dir / tool)]
    if os.geteuid() == 0 and not any(_is_executable(Path(d) / "runuser") for d in _path_dirs()):
        missing.append("runuser")
    return missing


def _path_dirs() -> list[str]:
    return os.environ.get("PATH", os.defpath).split(os.pathsep)


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _required_bin_dir() -> Path:
    bin_dir = pg_bin_dir()
    if bin_dir is None:
        raise PostgresError("no PostgreSQL under /usr/lib/postgresql/*/bin and PGBIN unset")
    return bin_dir


def _pg_env() -> dict[str, str]:
    """Environment for PostgreSQL tools: the caller's, minus libpq variables that could redirect them."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env["PGCONNECT_TIMEOUT"] = "5"
    return env


def pg_dsn(port: int, dbname: str = "postgres") -> str:
    """``postgresql://postgres@127.0.0.1:PORT/DBNAME``; add ``+asyncpg`` for SQLAlchemy."""
    return f"postgresql://{PG_SUPERUSER}@{LOOPBACK}:{port}/{dbname}"


def psql(dsn: str, sql: str, *, timeout: float = 30.0) -> str:
    """Run ``sql`` with ``psql`` against ``dsn``; its unaligned, tuples-only output, stripped.

    Rows come one per line, columns separated by ``|``. Raises :class:`PostgresError` carrying psql's
    error message when the connection or any statement fails.
    """
    argv = [str(_required_bin_dir() / "psql"), "-X", "-v", "ON_ERROR_STOP=1", "-d", dsn, "-Atc", sql]
    result = subprocess.run(
        argv,
        env=_pg_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise PostgresError(f"psql {dsn} failed (exit {result.returncode}): {result.stderr.strip()}")
    return result.stdout.strip()


class PostgresPair:
    """A primary on ``primary_port`` and its streaming replica on ``replica_port``, under ``base_dir``.

    :meth:`start` runs initdb, starts the primary, takes a base backup and starts the replica from it;
    :meth:`stop` stops both immediately (falling back to SIGKILL) and never raises. When run as root, the
    directories above ``base_dir`` must let the ``postgres`` user through (mode ``0711`` at least).
    """

    def __init__(
        self, base_dir: Path, primary_port: int, replica_port: int, *, timeout: float = 30.0
    ) -> None:
        self.base_dir = base_dir
        self.primary_port = primary_port
        self.replica_port = replica_port
        self.timeout = timeout
        self._bin = Path()
        self._as_postgres: list[str] = []

    @property
    def primary_dsn(self) -> str:
        return pg_dsn(self.primary_port)

    @property
    def replica_dsn(self) -> str:
        """Same form as :attr:`primary_dsn`, for the hot-standby replica (read-only)."""
        return pg_dsn(self.replica_port)

    @property
    def _primary_dir(self) -> Path:
        return self.base_dir / "primary"

    @property
    def _replica_dir(self) -> Path:
        return self.base_dir / "replica"

    @property
    def _primary_log(self) -> Path:
        return self.base_dir / "primary.log"

    @property
    def _replica_log(self) -> Path:
        return self.base_dir / "replica.log"

    def start(self) -> None:
        self._bin = _required_bin_dir()
        self._prepare_dir()
        initdb_args = [
            "-D", str(self._primary_dir),
            "-U", PG_SUPERUSER, "-A", "trust",
            "-E", "UTF8", "--locale=C.UTF-8",
            "--no-sync", "--no-instructions",
        ]  # fmt: skip
        self._run("initdb", initdb_args)
        settings = {**_PG_SETTINGS, "port": str(self.primary_port)}
        # A socket directory of our own: /var/run/postgresql may be missing or belong to a system cluster.
        settings["unix_socket_directories"] = f"'{self.base_dir}'"
        _append_conf(self._primary_dir / "postgresql.conf", settings)
        self._pg_ctl_start(self._primary_dir, self._primary_log)

        # -R writes standby.signal and primary_conninfo; -c fast skips waiting for a spread checkpoint.
        basebackup_args = [
            "-h", LOOPBACK, "-p", str(self.primary_port), "-U", PG_SUPERUSER,
            "-D", str(self._replica_dir),
            "-R", "-X", "stream", "-c", "fast", "--no-sync",
        ]  # fmt: skip
        self._run("pg_basebackup", basebackup_args, log=self._primary_log)
        # The copied postgresql.conf still names the primary's port; the auto.conf entry wins.
        _append_conf(self._replica_dir / "postgresql.auto.conf", {"port": str(self.replica_port)})
        self._pg_ctl_start(self._replica_dir, self._replica_log)

    def stop(self) -> None:
        for data_dir in (self._replica_dir, self._primary_dir):
            self._stop_cluster(data_dir)

    # -- databases --

    def create_database(self, name: str, *, timeout: float = 10.0) -> tuple[str, str]:
        """Create database ``name`` on the primary and wait until the replica serves it too.

        Returns ``(primary_dsn, replica_dsn)`` of the new database. ``name`` must be a plain lowercase
        identifier (``[a-z_][a-z0-9_]*``, at most 63 characters); raises ``PostgresError`` if it exists.
        """
        if not _DATABASE_NAME.fullmatch(name):
            raise ValueError(f"database name must match {_DATABASE_NAME.pattern}: {name!r}")
        psql(self.primary_dsn, f'CREATE DATABASE "{name}"')
        primary_dsn = pg_dsn(self.primary_port, name)
        replica_dsn = pg_dsn(self.replica_port, name)
        wait_until(lambda: _answers(replica_dsn), timeout=timeout, what=f"database {name} on the replica")
        return primary_dsn, replica_dsn

    def wait_for_replica(self, timeout: float = 5.0) -> None:
        """Wait until the replica has replayed everything the primary had written when this was called."""
        lsn = psql(self.primary_dsn, "SELECT pg_current_wal_lsn()")
        query = f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn"
        wait_until(lambda: psql(self.replica_dsn, query) == "t", timeout=timeout, what=f"replay of {lsn}")

    # -- failure injection --

    def pause_replica_replay(self) -> None:
        """Freeze the replica's view: WAL keeps streaming in but is not applied until resumed."""
        psql(self.replica_dsn, "SELECT pg_wal_replay_pause()")

    def resume_replica_replay(self) -> None:
        psql(self.replica_dsn, "SELECT pg_wal_replay_resume()")

    def stop_replica(self) -> None:
        """Kill the replica like a crash (``pg_ctl stop -m immediate``); connections to it are refused."""
        self._stop_cluster(self._replica_dir)

    def start_replica(self) -> None:
        """Start the replica again; it reconnects to the primary and catches up with what it missed."""
        self._pg_ctl_start(self._replica_dir, self._replica_log)

    # -- the tools --

    def _prepare_dir(self) -> None:
        self.base_dir.mkdir(parents=True)
        if os.geteuid() != 0:
            self._as_postgres = []
            return
        user = _ensure_postgres_user()
        os.chown(self.base_dir, user.pw_uid, user.pw_gid)
        self._as_postgres = ["runuser", "-u", user.pw_name, "--"]

    def _pg_ctl_start(self, data_dir: Path, log: Path) -> None:
        args = ["-D", str(data_dir), "-l", str(log), "-w", "-t", str(int(self.timeout)), "start"]
        self._run("pg_ctl", args, log=log)

    def _stop_cluster(self, data_dir: Path) -> None:
        """Stop one cluster immediately; fall back to SIGKILL. Never raises."""
        if not (data_dir / "postmaster.pid").exists():
            return
        try:
            self._run("pg_ctl", ["-D", str(data_dir), "-m", "immediate", "-w", "-t", "10", "stop"])
        except (PostgresError, OSError, subprocess.TimeoutExpired):
            _kill_postmaster(data_dir)

    def _run(self, tool: str, args: list[str], *, log: Path | None = None) -> None:
        """Run a PostgreSQL tool as the postgres user; ``PostgresError`` with its output on failure."""
        argv = [*self._as_postgres, str(self._bin / tool), *args]
        # cwd must be readable by the postgres user: initdb fails when started from e.g. /root.
        result = subprocess.run(
            argv,
            cwd=self.base_dir,
            env=_pg_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=self.timeout + 30,
            check=False,
            start_new_session=True,
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip()
            details = f"\n{log_tail(log, 20)}" if log is not None else ""
            raise PostgresError(f"{tool} failed (exit {result.returncode}): {output}{details}")


def _answers(dsn: str) -> bool:
    try:
        return psql(dsn, "SELECT 1") == "1"
    except PostgresError:
        return False


def _append_conf(path: Path, settings: dict[str, str]) -> None:
    with path.open("a") as conf:
        conf.write("\n# devinfra.postgres\n")
        conf.writelines(f"{key} = {value}\n" for key, value in settings.items())


def _ensure_postgres_user() -> pwd.struct_passwd:
    """The ``postgres`` OS account, created as a system account when the package did not."""
    try:
        return pwd.getpwnam(PG_SUPERUSER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_SUPERUSER],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(PG_SUPERUSER)


def _kill_postmaster(data_dir: Path) -> None:
    """SIGKILL the postmaster named in ``postmaster.pid`` and its children.

    pg_ctl starts the postmaster as a process group leader, so killing the group reaches every backend.
    """
    try:
        pid = int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        command = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError):
        return
    if command != "postgres":  # a stale pid file; the number may belong to an unrelated process by now
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
