"""What Kafka would hand the persister, without a broker.

The gateway produces `Message.kafka_value()` with key = room to the room's partition
(shared.keys, the Kafka default partitioner); the broker gives each record the next offset of its
partition (dense: no transactions, no compaction); the persister's consumer returns them as
`ConsumerRecord`s, up to `persister_batch_max` per fetch, in offset order per partition, decoded
by shared.kafka.decode as every reader of the log does. `SimLog` does exactly that, so the
persister's `apply_all` gets what a real fetch would give.
`SimConsumer` answers what `Persister.take_partitions` asks a consumer (the log starts at 0).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from aiokafka import ConsumerRecord, TopicPartition

from shared.cursor import Position
from shared.kafka import Fetched, decode
from shared.keys import Keys
from shared.message import Message

CREATE_TIME = 0  # the record's timestamp type: the producer's clock (here the simulated one)


class SimLog:
    def __init__(self, topic: str, keys: Keys) -> None:
        self.topic = topic
        self.keys = keys
        self.next = [0] * keys.partitions  # partition -> the offset its next record gets

    def append(self, sends: list[Message]) -> list[Message]:
        """The sends, in order, with the positions the broker gives them."""
        out = []
        for m in sends:
            p = self.keys.partition(m.room)
            out.append(dataclasses.replace(m, position=Position(p, self.next[p])))
            self.next[p] += 1
        return out

    def fetches(self, messages: list[Message], max_records: int) -> Iterator[list[Fetched]]:
        """The appended messages as consecutive fetches of up to `max_records` records."""
        for i in range(0, len(messages), max_records):
            batch: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = {}
            for m in messages[i:i + max_records]:
                assert m.position is not None
                key, value = m.room.encode(), m.kafka_value()
                record = ConsumerRecord(self.topic, m.position.partition, m.position.offset, m.ts, CREATE_TIME,
                                        key, value, None, len(key), len(value), ())
                batch.setdefault(TopicPartition(self.topic, m.position.partition), []).append(record)
            yield [decode(tp, records) for tp, records in batch.items()]


class SimConsumer:
    """The consumer calls `Persister.take_partitions` makes, for a log that starts at offset 0."""

    def __init__(self, tps: list[TopicPartition]) -> None:
        self.tps = set(tps)
        self.seeks: list[tuple[TopicPartition, int]] = []

    def assignment(self) -> set[TopicPartition]:
        return set(self.tps)

    def pause(self, *tps: TopicPartition) -> None:
        pass

    def resume(self, *tps: TopicPartition) -> None:
        pass

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))

    def highwater(self, tp: TopicPartition) -> int:
        """(The log is read as it grows: every fetch reaches its end, nothing is replayed.)"""
        return 0

    async def seek_to_beginning(self, *tps: TopicPartition) -> None:
        self.seeks += [(tp, 0) for tp in tps]
