"""Development infrastructure: the local processes that tests, benchmarks and ``relaygate up`` run.

It lives at the top level, beside ``services/``, because it belongs to no service and is not part of a
deployment's request path: it starts and stops *processes* (PostgreSQL, Redis, Apache Kafka, the services
themselves) on loopback, for the test suite, ``bench/`` and the laptop stack. It depends on the standard
library only, so ``services.stack`` may use it while nothing here imports a service; ``bench/`` imports it
instead of reaching into ``tests/``.

- :mod:`devinfra.processes` free ports, a child process in its own session with its log file, waits;
- :mod:`devinfra.postgres` a PostgreSQL primary with a streaming replica;
- :mod:`devinfra.kafka` Apache Kafka (single-node KRaft): fetching its jars, formatting, starting;
- :mod:`devinfra.backing` all the backing services of one test session or benchmark run.
"""
