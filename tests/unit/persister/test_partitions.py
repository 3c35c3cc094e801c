"""Partition bookkeeping: the expected marks, rewinds, retention gaps, lag."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from persister.partitions import Partitions, resume_offset


def test_take_drop_and_ownership() -> None:
    p = Partitions()
    p.take(3, None)
    p.take(5, 41)
    assert 3 in p and 5 in p and 4 not in p
    assert sorted(p) == [3, 5]
    assert p.expected(5) == 41 and p.expected(3) is None and p.expected(4) is None
    p.drop([3, 9])
    assert 3 not in p and sorted(p) == [5]


def test_iterating_while_dropping_is_safe() -> None:
    p = Partitions()
    for i in range(4):
        p.take(i, i)
    walked = []
    for i in p:  # (a rebalance may drop partitions while the flush loop walks them)
        walked.append(i)
        p.drop([i + 1])
    assert walked == [0, 1, 2, 3] and list(p) == [0]


def test_moved_only_for_an_owned_partition_whose_stored_mark_differs() -> None:
    p = Partitions()
    p.take(1, 10)
    assert not p.moved(1, 10)
    assert p.moved(1, 7) and p.moved(1, None)
    assert not p.moved(2, 7), "not ours: nothing to rewind"


def test_applied_is_not_noted_for_a_revoked_partition() -> None:
    p = Partitions()
    p.take(1, None)
    assert p.applied(1, 4) and p.expected(1) == 4
    p.drop([1])
    assert not p.applied(1, 9) and 1 not in p


@given(st.one_of(st.none(), st.integers(-1, 10**6)), st.integers(0, 10**6))
def test_skipped_counts_the_gap_between_the_mark_and_a_fetch(mark: int | None, first: int) -> None:
    p = Partitions()
    p.take(0, mark)
    skipped = p.skipped(0, first)
    if mark is None or first <= mark + 1:
        assert skipped == 0  # no mark yet (read from the log's start), or the fetch continues the mark
    else:
        assert skipped == first - mark - 1 > 0


@given(st.one_of(st.none(), st.integers(0, 10**6)), st.integers(0, 10**6))
def test_lag_is_what_lies_between_the_mark_and_the_high_water(mark: int | None, high: int) -> None:
    p = Partitions()
    p.take(0, mark)
    applied = 0 if mark is None else mark + 1  # records applied: offsets 0..mark
    assert p.lag(0, high) == max(0, high - applied)


def test_resume_offset() -> None:
    assert resume_offset(None) is None
    assert resume_offset(-1) == 0
    assert resume_offset(41) == 42
