"""The logger service: consumes usage events from Kafka into ``request_logs`` and answers log queries.

``__main__`` → :mod:`.settings` → :mod:`.app` shows how the process starts and what it owns; the rest
are its nouns: :mod:`.consumer`, :mod:`.batch`, :mod:`.writer`, :mod:`.dlq`, :mod:`.query` and the gRPC
:mod:`.servicer`.
"""
