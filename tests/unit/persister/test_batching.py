"""Batching: a later fetch merged into the batch per partition."""

from __future__ import annotations

from aiokafka import TopicPartition
from hypothesis import given
from hypothesis import strategies as st

from persister.batching import merge, records
from shared.cursor import Position
from shared.kafka import Fetched
from shared.message import Message

A, B = TopicPartition("t", 0), TopicPartition("t", 1)


def fetched(tp: TopicPartition, first: int, n: int, holes: frozenset[int] = frozenset()) -> Fetched:
    """n records from `first`; the offsets in `holes` are records that are not messages."""
    msgs = [Message(f"id{o}", "r", "u", "b", 1, "", Position(tp.partition, o))
            for o in range(first, first + n) if o not in holes]
    return Fetched(tp, msgs, first, first + n)


def test_a_continuing_read_is_appended() -> None:
    batch = {A: fetched(A, 10, 3)}
    merge(batch, [fetched(A, 13, 2), fetched(B, 0, 4)])
    assert (batch[A].first_offset, batch[A].next_offset) == (10, 15)
    assert [m.position.offset for m in batch[A].messages if m.position] == [10, 11, 12, 13, 14]
    assert batch[B].next_offset == 4
    assert records(batch.values()) == 9


def test_a_partition_sought_meanwhile_takes_the_later_read() -> None:
    batch = {A: fetched(A, 10, 3)}
    merge(batch, [fetched(A, 5, 2)])  # rewound to 5 between the two fetches
    assert (batch[A].first_offset, batch[A].next_offset) == (5, 7)
    assert len(batch[A].messages) == 2


@given(st.lists(st.integers(1, 20), min_size=1, max_size=8), st.sets(st.integers(0, 200)))
def test_consecutive_reads_merge_into_one_dense_range(sizes: list[int], holes: set[int]) -> None:
    start, batch = 7, {}
    reads, at = [], 7
    for n in sizes:
        reads.append(fetched(A, at, n, frozenset(holes)))
        at += n
    batch = {A: reads[0]}
    merge(batch, reads[1:])
    got = batch[A]
    assert (got.first_offset, got.next_offset) == (start, at)
    assert [m.position.offset for m in got.messages if m.position] == [o for o in range(start, at) if o not in holes]
    assert records(batch.values()) == at - start
