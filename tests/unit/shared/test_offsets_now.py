"""Where the fan-out starts: the first record newer than now, else the end offset."""

from __future__ import annotations

from aiokafka import TopicPartition
from aiokafka.structs import OffsetAndTimestamp

from shared.kafka import offsets_now

A, B, C = (TopicPartition("t", p) for p in range(3))


class FakeConsumer:  # the unit's edge: the two lookups offsets_now makes
    async def offsets_for_times(self, query: dict[TopicPartition, int]) -> dict[TopicPartition, object]:
        return {
            A: OffsetAndTimestamp(7, 1_700_000_000_000),  # a record newer than now (a concurrent send)
            B: None,  # Apache Kafka: nothing that new
            C: OffsetAndTimestamp(0, -1),  # Tansu: "nothing that new" as offset 0, timestamp -1
        }

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {A: 9, B: 40, C: 1210}


async def test_a_newer_record_wins_and_no_answer_means_the_end() -> None:
    assert await offsets_now(FakeConsumer(), [A, B, C]) == {A: 7, B: 40, C: 1210}  # type: ignore[arg-type]
