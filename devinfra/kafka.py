"""Apache Kafka as a single-node KRaft broker on loopback, run from its Maven Central jars with ``java``.

The jars are fetched once into a cache folder (``~/.cache/relaygate/kafka-<version>/lib``) with Maven's
dependency plugin: ``python -m devinfra.kafka fetch`` (``tests/infra/setup.sh`` runs it). Kafka 4.x
publishes no log4j2 binding in its pom, and without one the broker prints nothing (so no
``Kafka Server started`` line to wait for); the fetch adds ``log4j-slf4j2-impl`` and the slf4j 2 API it
binds to (the broker's pom would otherwise resolve slf4j 1.7, which ignores that binding).

A :class:`KafkaBroker` owns one work directory: its configuration, its log file and its data (``data/``).
The data directory is formatted on the first start only, so a stopped broker started again on the same
directory keeps its topics, records, committed offsets and producer state.
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

from devinfra.processes import LOOPBACK, InfraError, ManagedProcess, StartError

__all__ = [
    "KAFKA_VERSION",
    "KafkaBroker",
    "KafkaError",
    "fetch",
    "kafka_home",
    "kafka_lib",
    "missing_kafka",
]

KAFKA_VERSION = "4.1.2"
_LOG4J_VERSION = "2.24.3"
_SLF4J_VERSION = "2.0.16"
_ARTIFACTS = (
    ("org.apache.kafka", "kafka_2.13", KAFKA_VERSION),
    ("org.apache.logging.log4j", "log4j-core", _LOG4J_VERSION),
    ("org.apache.logging.log4j", "log4j-slf4j2-impl", _LOG4J_VERSION),
    ("org.slf4j", "slf4j-api", _SLF4J_VERSION),
)
# The full plugin coordinates: the short ``dependency:`` prefix does not resolve on every Maven setup.
_COPY_DEPENDENCIES = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy-dependencies"
READY_LINE = "Kafka Server started"
FETCH_HINT = "run: python -m devinfra.kafka fetch (bash tests/infra/setup.sh does)"

# One node is broker and controller. Replication factor 1 everywhere; few internal partitions, so the
# first group join and the first transaction do not wait for 50 partitions each. The tests shrink
# session timeouts to 1 s, below the broker's 6 s floor by default. A broker restarted after a crash
# cannot register until the controller has fenced its previous session, 9 s by default: 3 s here. A 16 MB
# dedupe buffer instead of 128 MB fits the small heap.
#
# Idle footprint (the broker runs beside everything else on small machines): measured over 30 s on an
# idle broker with no clients, 23 ms of CPU per second with Kafka's timers, 15 ms/s with these. Most of
# it was the controller writing a no-op record to the metadata log every 500 ms
# (metadata.max.idle.interval.ms; nothing waits on them with one node) and the broker's heartbeat every
# 500 ms (1 s still gives three per 3 s session). One network thread serves a handful of loopback
# connections. Durability is untouched: no flush settings here, producers keep acks=all and idempotence.
_SERVER_PROPERTIES = """\
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@{host}:{controller_port}
listeners=PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}
advertised.listeners=PLAINTEXT://{host}:{port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs={data_dir}
num.partitions=4
num.network.threads=1
num.io.threads=2
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
share.coordinator.state.topic.num.partitions=1
group.initial.rebalance.delay.ms=0
group.min.session.timeout.ms=500
broker.heartbeat.interval.ms=1000
metadata.max.idle.interval.ms=5000
background.threads=2
broker.session.timeout.ms=3000
log.cleaner.dedupe.buffer.size=16777216
"""

# Warnings only, except the line that says the broker is ready.
_LOG4J2_PROPERTIES = """\
status = warn
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.out.ref = out
logger.ready.name = kafka.server.KafkaRaftServer
logger.ready.level = INFO
"""

_POM = """\
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>relaygate.devinfra</groupId>
  <artifactId>kafka-broker</artifactId>
  <version>{version}</version>
  <packaging>pom</packaging>
  <dependencies>
{dependencies}
  </dependencies>
</project>
"""


class KafkaError(InfraError):
    """Java, Maven or the Kafka jars are missing, or fetching the jars failed."""


def kafka_home(version: str = KAFKA_VERSION) -> Path:
    """Where the jars of ``version`` live: ``$RELAYGATE_KAFKA_HOME``, else the user's cache folder."""
    if explicit := os.environ.get("RELAYGATE_KAFKA_HOME"):
        return Path(explicit)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "relaygate" / f"kafka-{version}"


def kafka_lib(home: Path | None = None) -> Path | None:
    """The folder of fetched jars, or ``None`` when they have not been fetched (completely)."""
    lib = (home or kafka_home()) / "lib"
    return lib if lib.is_dir() else None


def missing_kafka() -> list[str]:
    """What running a broker needs and cannot find (``java``, the jars); empty when all is there."""
    missing = [] if shutil.which("java") else ["java"]
    if kafka_lib() is None:
        missing.append(f"Apache Kafka {KAFKA_VERSION} jars in {kafka_home() / 'lib'}")
    return missing


def fetch(home: Path | None = None) -> Path:
    """Fetch the broker's jars from Maven Central into ``home/lib`` unless already there; the lib path.

    The jars are copied into a scratch folder renamed into place at the end, so an interrupted fetch
    never leaves a half-filled ``lib`` behind, and of two concurrent fetches the second to finish
    keeps the first one's folder.
    """
    home = home or kafka_home()
    if (lib := kafka_lib(home)) is not None:
        return lib
    mvn = shutil.which("mvn")
    if mvn is None:
        raise KafkaError("Maven (mvn) is needed once to fetch the Kafka jars: apt-get install -y maven")
    home.mkdir(parents=True, exist_ok=True)
    dependencies = "\n".join(
        f"    <dependency><groupId>{group}</groupId><artifactId>{artifact}</artifactId>"
        f"<version>{version}</version></dependency>"
        for group, artifact, version in _ARTIFACTS
    )
    pom = home / "pom.xml"
    pom.write_text(_POM.format(version=KAFKA_VERSION, dependencies=dependencies))
    scratch = home / f"lib.partial-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    argv = [mvn, "-B", "-q", "-f", str(pom), _COPY_DEPENDENCIES]
    argv += [f"-DoutputDirectory={scratch}", "-DincludeScope=runtime"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
    if result.returncode != 0:
        shutil.rmtree(scratch, ignore_errors=True)
        raise KafkaError(f"fetching the Kafka jars failed (mvn exit {result.returncode}):\n{result.stdout}")
    lib = home / "lib"
    try:
        scratch.rename(lib)
    except OSError:
        if not lib.is_dir():
            raise
        shutil.rmtree(scratch, ignore_errors=True)
    return lib


def cluster_id() -> str:
    """A new KRaft cluster id: a UUID in URL-safe base64, 22 characters, never starting with ``-``."""
    while True:
        candidate = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not candidate.startswith("-"):
            return candidate


class KafkaBroker:
    """One broker+controller listening on ``127.0.0.1:port`` (controller on ``controller_port``).

    :meth:`start` formats ``work_dir/data`` unless already formatted, starts the JVM and returns once
    the broker logged ``Kafka Server started`` and its port accepts connections (2.5 s on two idle
    cores, 6 s on busy ones; about 160 MB resident). :meth:`stop` shuts it down cleanly (under 1 s),
    :meth:`kill` like a crash; either way the data stays, and :meth:`start` brings it back with its
    log. Ports may change between starts.
    """

    def __init__(
        self,
        work_dir: Path,
        port: int,
        controller_port: int,
        *,
        heap_mb: int = 384,
        log_path: Path | None = None,
    ) -> None:
        self.work_dir = work_dir
        self.port = port
        self.controller_port = controller_port
        self.heap_mb = heap_mb
        self.log_path = log_path or work_dir / "kafka.log"
        self.process: ManagedProcess | None = None

    @property
    def bootstrap(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.work_dir / "data"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.running

    def start(self, timeout: float = 90.0) -> KafkaBroker:
        """:meth:`launch` then :meth:`wait_ready`."""
        self.launch()
        self.wait_ready(timeout)
        return self

    def launch(self) -> None:
        """Format the data directory if new and start the JVM, without waiting; no-op when running."""
        if self.running:
            return
        lib = kafka_lib()
        if lib is None or shutil.which("java") is None:
            raise KafkaError(f"cannot run Kafka, missing: {', '.join(missing_kafka())}; {FETCH_HINT}")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        (self.work_dir / "log4j2.properties").write_text(_LOG4J2_PROPERTIES)
        (self.work_dir / "server.properties").write_text(
            _SERVER_PROPERTIES.format(
                host=LOOPBACK, port=self.port, controller_port=self.controller_port, data_dir=self.data_dir
            )
        )
        if not (self.data_dir / "meta.properties").exists():
            self._format(lib)
        argv = self._java(lib, "kafka.Kafka", str(self.work_dir / "server.properties"))
        self.process = ManagedProcess("kafka", argv, self.log_path)

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Return once the broker logged that it started and accepts connections; on failure, kill it."""
        if self.process is None:
            raise KafkaError("the broker was not launched")
        try:
            self.process.wait_for_output(READY_LINE, timeout)
            self.process.wait_listening(self.port, timeout=timeout)
        except StartError:
            self.kill()
            raise

    def stop(self) -> None:
        """Clean shutdown (SIGTERM; SIGKILL after 30 s). No-op when not running."""
        if self.process is not None:
            self.process.stop(grace=30.0)
            self.process = None

    def kill(self) -> None:
        """SIGKILL: what the broker had not written to its files is lost, as in a crash."""
        if self.process is not None:
            self.process.kill()
            self.process = None

    def erase(self) -> None:
        """SIGKILL the broker and delete its data: the next :meth:`start` formats an empty broker (a
        new cluster), as after an unclean failover onto a replica that had nothing."""
        self.kill()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def _java(self, lib: Path, main_class: str, *args: str) -> list[str]:
        # C1 only: on two busy cores the C2 compiler doubled the start (6 s → 12 s), and under a steady
        # 200 events/s its compiling cost more than it saved for minutes (broker CPU 224 ms/s against
        # 100 ms/s with C1, 30 s after a 10 s warm-up).
        return [
            "java",
            f"-Xmx{self.heap_mb}m",
            "-Xms32m",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.work_dir / 'log4j2.properties'}",
            "-cp",
            f"{lib}/*",
            main_class,
            *args,
        ]

    def _format(self, lib: Path) -> None:
        argv = self._java(lib, "kafka.tools.StorageTool", "format", "-t", cluster_id())
        argv += ["-c", str(self.work_dir / "server.properties")]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        if result.returncode != 0:
            raise KafkaError(f"formatting {self.data_dir} failed:\n{result.stdout}{result.stderr}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devinfra.kafka", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("fetch", help="fetch the broker's jars from Maven Central (once)")
    commands.add_parser("home", help="print the folder holding the jars")
    args = parser.parse_args(argv)
    if args.command == "home":
        print(kafka_home())
        return 0
    try:
        print(fetch())
    except KafkaError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
