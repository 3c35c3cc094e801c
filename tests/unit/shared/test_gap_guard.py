"""A fetch that skips offsets is cut at the gap and read again, once."""

from __future__ import annotations

from shared.kafka import GapGuard


def test_dense_offsets_pass_whole() -> None:
    assert GapGuard().cut(0, 10, [10, 11, 12]) == (3, None)


def test_replayed_offsets_below_the_position_pass() -> None:
    assert GapGuard().cut(0, 10, [8, 9, 10, 11]) == (4, None)


def test_a_gap_at_the_start_is_read_again_once_then_accepted() -> None:
    g = GapGuard()
    assert g.cut(0, 10, [15, 16]) == (0, 10)
    assert g.cut(0, 10, [15, 16]) == (2, None)


def test_a_gap_inside_a_batch_cuts_it_there() -> None:
    assert GapGuard().cut(3, 10, [10, 11, 14, 15]) == (2, 12)


def test_unknown_position_takes_the_first_record_as_the_start() -> None:
    g = GapGuard()
    assert g.cut(0, None, [5, 6, 7]) == (3, None)
    assert g.cut(1, None, [5, 7]) == (1, 6)


def test_partitions_are_independent() -> None:
    g = GapGuard()
    assert g.cut(0, 0, [2]) == (0, 0)
    assert g.cut(1, 0, [2]) == (0, 0)
