"""Flush scheduling: which rooms wait for a move to MySQL, and the back-off between failed tries."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from persister.flushing import Backoff, FlushQueue


def test_a_room_is_queued_only_past_the_cap() -> None:
    q = FlushQueue(cap=200)
    assert not q.note("a", 200) and not q
    assert q.note("b", 201) and q
    assert q.pop() == "b" and not q
    assert q.buffered() == 401


def test_added_rooms_are_flushed_once_each() -> None:
    q = FlushQueue(cap=5)
    for room in ("a", "b", "a"):
        q.add(room)
    q.note("b", 9)
    assert sorted(q.pop() for _ in range(2)) == ["a", "b"] and not q


@given(st.integers(1, 40))
def test_backoff_doubles_to_its_ceiling_with_jitter_and_resets(failures: int) -> None:
    b = Backoff(first=0.1, most=5.0)
    for i in range(failures):
        base = min(0.1 * 2**i, 5.0)
        assert 0.5 * base <= b.failed() <= 1.5 * base
    b.ok()
    assert 0.05 <= b.failed() <= 0.15
