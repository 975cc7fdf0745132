"""The dead-letter topic: where messages the logger cannot store go, with where they came from and why.

A dead letter keeps the original key, value and headers, and adds ``source_topic``,
``source_partition``, ``source_offset``, ``consumer_group`` and ``reason`` (``"<class>: <message>"``)
headers, so an operator can inspect it, fix the producer and replay it.
"""

from __future__ import annotations

import logging
from typing import Any

from aiokafka import AIOKafkaProducer

from services.common.config import KafkaSettings
from services.common.telemetry import METRICS

log = logging.getLogger(__name__)

# Headers are for people and tools; a multi-kilobyte parser message helps neither.
_MAX_REASON_CHARS = 1000


def dead_letter_producer(settings: KafkaSettings) -> AIOKafkaProducer:
    """The producer the logger sends dead letters with (not started)."""
    return AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        client_id="relaygate-logger-dlq",
        acks="all",
        request_timeout_ms=10_000,
    )


class DeadLetters:
    """Publishes unusable messages to the dead-letter topic; one per consumer, sharing a started producer."""

    def __init__(self, producer: AIOKafkaProducer, *, topic: str, group_id: str) -> None:
        self._producer = producer
        self.topic = topic
        self._group_id = group_id.encode()

    async def send(self, record: Any, reason: Exception) -> None:
        """Publish ``record`` (an aiokafka ``ConsumerRecord``) and wait for the broker's acknowledgement.

        Raises whatever the producer raises; the caller must not commit the record's offset until this
        has returned.
        """
        explanation = f"{type(reason).__name__}: {reason}"[:_MAX_REASON_CHARS]
        headers = [
            *(record.headers or ()),
            ("source_topic", record.topic.encode()),
            ("source_partition", str(record.partition).encode()),
            ("source_offset", str(record.offset).encode()),
            ("consumer_group", self._group_id),
            ("reason", explanation.encode()),
        ]
        await self._producer.send_and_wait(self.topic, value=record.value, key=record.key, headers=headers)
        METRICS.logger_dead_letters.labels(reason=type(reason).__name__).inc()
        log.warning(
            "dead-lettered a message",
            extra={
                "source_topic": record.topic,
                "source_partition": record.partition,
                "source_offset": record.offset,
                "reason": explanation,
            },
        )
