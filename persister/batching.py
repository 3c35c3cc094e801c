"""Batching: one fetch plus what arrives within the linger, merged per partition into one batch,
applied in one Redis round trip (at low rates a fetch brings a record or two, and a round trip per
partition per fetch cost more than the appends; the linger delays nothing but storage)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, TopicPartition

from shared.kafka import Fetched, fetch


def records(batch: Iterable[Fetched]) -> int:
    return sum(f.next_offset - f.first_offset for f in batch)


def merge(batch: dict[TopicPartition, Fetched], later: Iterable[Fetched]) -> None:
    """Add a later fetch to `batch`: a partition's records that continue its part are appended; a
    partition sought meanwhile (its later read does not continue) takes the later read."""
    for f in later:
        had = batch.get(f.tp)
        if had is not None and f.first_offset == had.next_offset:
            had.messages.extend(f.messages)
            had.next_offset = f.next_offset
        else:
            batch[f.tp] = f


async def gather(consumer: AIOKafkaConsumer, most: int, linger_s: float) -> list[Fetched]:
    """The next batch: up to `most` records from one fetch, and what else arrives within `linger_s`."""
    batch = {f.tp: f for f in await fetch(consumer, timeout_ms=200, max_records=most)}
    n = records(batch.values())
    if not batch or n >= most:
        return list(batch.values())
    await asyncio.sleep(linger_s)
    merge(batch, await fetch(consumer, timeout_ms=0, max_records=most - n))
    return list(batch.values())
