"""A fetch that skips offsets is cut at the gap and read again until the gap has lasted `wait_s`."""

from __future__ import annotations

from shared.kafka import GapGuard


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_dense_offsets_pass_whole() -> None:
    assert GapGuard(1.0).cut(0, 10, [10, 11, 12]) == (3, None)


def test_replayed_offsets_below_the_position_pass() -> None:
    assert GapGuard(1.0).cut(0, 10, [8, 9, 10, 11]) == (4, None)


def test_a_gap_is_read_again_until_it_has_lasted_the_wait_then_accepted() -> None:
    clock = Clock()
    g = GapGuard(2.0, clock)
    assert g.cut(0, 10, [15, 16]) == (0, 10)
    clock.now += 1.0
    assert g.cut(0, 10, [15, 16]) == (0, 10), "still within the wait: read again"
    clock.now += 1.5
    assert g.cut(0, 10, [15, 16]) == (2, None), "waited long enough: the gap is accepted"
    assert g.cut(0, 10, [15, 16]) == (0, 10), "a new sighting starts a new wait"


def test_a_gap_that_fills_is_read_whole_and_forgotten() -> None:
    clock = Clock()
    g = GapGuard(2.0, clock)
    assert g.cut(0, 10, [10, 12]) == (1, 11)
    assert g.cut(0, 11, [11, 12, 13]) == (3, None)
    assert g.cut(0, 14, [14]) == (1, None)
    clock.now += 5
    assert g.cut(0, 10, [10, 12]) == (1, 11), "the same gap seen after a seek back waits anew"
    assert g.cut(0, 11, [13]) == (0, 11)


def test_a_gap_inside_a_batch_cuts_it_there() -> None:
    assert GapGuard(1.0).cut(3, 10, [10, 11, 14, 15]) == (2, 12)


def test_unknown_position_takes_the_first_record_as_the_start() -> None:
    g = GapGuard(1.0)
    assert g.cut(0, None, [5, 6, 7]) == (3, None)
    assert g.cut(1, None, [5, 7]) == (1, 6)


def test_partitions_are_independent() -> None:
    g = GapGuard(1.0)
    assert g.cut(0, 0, [2]) == (0, 0)
    assert g.cut(1, 0, [2]) == (0, 0)


def test_no_wait_accepts_a_gap_on_the_second_read() -> None:
    g = GapGuard(0.0)
    assert g.cut(0, 10, [15]) == (0, 10)
    assert g.cut(0, 10, [15]) == (1, None)
