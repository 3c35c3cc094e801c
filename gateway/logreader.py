"""Reading a room's records straight from its Kafka partition: what a resume replays when the
persister is behind or a store is away."""

from __future__ import annotations

import time

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from shared.errors import Unavailable
from shared.kafka import fetch, new_consumer
from shared.settings import Settings


class Reads:
    """Stored entries and log records a resume read, wherever they came from."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


class LogTruncated(Unavailable):
    """Retention deleted the start of the range asked for."""

    def __init__(self, log_start: int) -> None:
        super().__init__(f"the log no longer holds offsets before {log_start}")
        self.log_start = log_start


async def read_room(settings: Settings, partition: int, room: str, start: int, end: int, reads: Reads
                    ) -> list[bytes]:
    """The room's records at offsets [start, end) of its partition, as stored entries (copies of one
    id included: the caller dedupes): a short-lived assign + seek. Raises LogTruncated when retention
    has deleted `start` already (never skips silently), Unavailable when the log does not answer in
    time. `reads` counts the records fetched."""
    if start >= end:
        return []
    tp = TopicPartition(settings.kafka_topic, partition)
    consumer = new_consumer(settings, group_id=None, fetch_max_wait_ms=50)
    out: list[bytes] = []
    try:
        await consumer.start()
        consumer.assign([tp])
        log_start = (await consumer.beginning_offsets([tp]))[tp]
        if log_start > start:
            raise LogTruncated(log_start)
        consumer.seek(tp, start)
        deadline = time.monotonic() + settings.recovery_wait_s
        position = start
        while position < end:
            if time.monotonic() > deadline:
                raise Unavailable(f"reading the log took too long (offset {position} of [{start}, {end}))")
            for fetched in await fetch(consumer, tp, timeout_ms=500, max_records=5000):
                position = fetched.next_offset
                reads.n += len(fetched.messages)
                for msg in fetched.messages:
                    assert msg.position is not None
                    if msg.position.offset < end and msg.room == room:
                        out.append(msg.entry())
    except KafkaError as e:
        raise Unavailable("the log is unreachable") from e
    finally:
        await consumer.stop()
    return out
