"""Where the fan-out starts: each partition's high-water mark from a fetch, whatever ListOffsets says."""

from __future__ import annotations

from aiokafka import TopicPartition

from shared.kafka import offsets_now

A, B, C = (TopicPartition("t", p) for p in range(3))
HIGH = {A: 9, B: 40, C: 1213}


class FakeConsumer:  # the unit's edge: a consumer whose ListOffsets answers are off, as Tansu's were
    def __init__(self) -> None:
        self.seeks: dict[TopicPartition, int] = {}
        self.fetched: set[TopicPartition] = set()

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {A: 9, B: 39, C: 6}  # right; a batch early (Tansu memory); far behind (Tansu S3 after a restart)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks[tp] = offset

    async def getmany(self, *tps: TopicPartition, timeout_ms: int, max_records: int) -> dict[TopicPartition, list]:
        self.fetched.add(tps[len(self.fetched) % len(tps)])  # one partition answers per fetch
        return {}

    def highwater(self, tp: TopicPartition) -> int | None:
        return HIGH[tp] if tp in self.fetched else None


async def test_the_high_water_mark_of_a_fetch_wins_over_list_offsets() -> None:
    consumer = FakeConsumer()
    assert await offsets_now(consumer, [A, B, C]) == HIGH  # type: ignore[arg-type]
    assert consumer.seeks == {A: 9, B: 39, C: 6}, "the fetch starts at ListOffsets' answer, to read little"
