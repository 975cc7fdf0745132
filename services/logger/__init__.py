"""The logger service: consumes usage events from Kafka into ``request_logs`` and ``usage_hourly``, keeps
the log's day partitions, and answers log and usage queries.

``__main__`` → :mod:`.settings` → :mod:`.app` shows how the process starts and what it owns; the rest
are its nouns: :mod:`.consumer`, :mod:`.batch`, :mod:`.writer`, :mod:`.dlq`, :mod:`.partitions`,
:mod:`.query`, :mod:`.usage` and the gRPC :mod:`.servicer`.
"""
