"""Usage events on Kafka: the topics and the encoding every service agrees on.

Events are ``relaygate.events.v1.UsageEvent`` protobufs on ``<prefix>usage``, keyed by API key id so
that one partition orders one key's events; undecodable ones go to ``<prefix>usage.dlq``. The relay's
publisher (memory queue, on-disk spool, replay) is :mod:`services.relay.meter.publisher`; the logger consumes.
"""

from __future__ import annotations

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from services.common.config import KafkaSettings
from services.common.pb.relaygate.events.v1.events_pb2 import UsageEvent

# Kafka error code for "topic already exists" in a CreateTopics response.
_TOPIC_ALREADY_EXISTS = 36


def encode(event: UsageEvent) -> bytes:
    return event.SerializeToString()


def decode(payload: bytes) -> UsageEvent:
    """Parse one event; raises ``ValueError`` when the payload is not a valid event."""
    event = UsageEvent()
    try:
        event.ParseFromString(payload)
    except Exception as exc:  # protobuf raises DecodeError, a plain Exception subclass
        raise ValueError(f"undecodable UsageEvent: {exc}") from exc
    if not event.event_id:
        raise ValueError("UsageEvent without event_id")
    return event


async def create_missing_topics(settings: KafkaSettings) -> list[str]:
    """Create the usage and dead-letter topics where missing; returns the names it created."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=5000)
    await admin.start()
    try:
        response = await admin.create_topics(
            [
                NewTopic(
                    settings.usage_topic, num_partitions=settings.kafka_partitions, replication_factor=1
                ),
                NewTopic(settings.dead_letter_topic, num_partitions=1, replication_factor=1),
            ]
        )
        created: list[str] = []
        for topic, code, *_ in getattr(response, "topic_errors", []):
            if code == 0:
                created.append(topic)
            elif code != _TOPIC_ALREADY_EXISTS:
                raise RuntimeError(f"could not create topic {topic}: error code {code}")
        return created
    finally:
        await admin.close()


async def ensure_topics(settings: KafkaSettings) -> None:
    """Create the usage and dead-letter topics if they do not exist yet."""
    await create_missing_topics(settings)
