"""Back-pressure: the backlog past the cap, and pausing once past its budget."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from persister.backpressure import Backlog, Step


def test_backlog_counts_what_is_past_the_cap() -> None:
    b = Backlog(cap=100, budget=50)
    b.note("a", 130)
    b.note("b", 90)
    b.note("c", 101)
    assert b.rooms == {"a": 30, "c": 1} and b.total() == 31
    b.note("a", 100)  # flushed down to the cap
    assert b.rooms == {"c": 1}


def test_pause_past_the_budget_and_resume_once_back_under_it() -> None:
    b = Backlog(cap=10, budget=20)
    b.note("a", 25)
    assert b.step() is Step.KEEP  # 15 <= 20
    b.note("b", 16)
    assert b.step() is Step.PAUSE and b.paused  # 21 > 20
    assert b.step() is Step.KEEP, "paused once"
    b.note("a", 10)
    assert b.step() is Step.RESUME and not b.paused
    assert b.step() is Step.KEEP


@given(st.lists(st.tuples(st.sampled_from("abcd"), st.integers(0, 400)), max_size=60))
def test_steps_alternate_and_follow_the_total(notes: list[tuple[str, int]]) -> None:
    b = Backlog(cap=100, budget=150)
    last = Step.RESUME
    for room, length in notes:
        b.note(room, length)
        step = b.step()
        assert b.paused == (b.total() > 150)
        if step is not Step.KEEP:
            assert step is not last, "pause and resume alternate"
            last = step
