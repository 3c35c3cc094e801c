"""Cursor strings: the only client-supplied positions the server parses."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.cursor import CursorError, Position, join_point, parse_cursor


@pytest.mark.parametrize(("text", "expected"), [
    ("", None), ("0-0", Position(0, 0)), ("3-1842", Position(3, 1842)), ("7-start", Position(7, -1)),
    ("7--1", Position(7, -1)),  # what servers issued for "7-start" before: clients keep cursors
])
def test_valid_cursors(text: str, expected: Position | None) -> None:
    assert parse_cursor(text) == expected


def test_the_join_point_of_an_empty_partition_is_a_clean_cursor() -> None:
    assert join_point(6, 0) == "6-start"
    assert join_point(6, 1843) == "6-1842"
    assert parse_cursor(join_point(6, 0)) == Position(6, -1)


@pytest.mark.parametrize("text", ["3", "-1", "3-", "-5", "3--2", "3-Start", "3-start1", "a-1",
                                   "1-b", "²-1", "1-²", "1-2-3", " 1-2", "9" * 41])
def test_invalid_cursors_raise(text: str) -> None:
    with pytest.raises(CursorError):
        parse_cursor(text)


@given(st.integers(0, 10_000), st.integers(-1, 2**62))
def test_a_position_round_trips_through_its_cursor(partition: int, offset: int) -> None:
    assert parse_cursor(str(Position(partition, offset))) == Position(partition, offset)


@given(st.text(max_size=50))
def test_any_text_is_a_cursor_or_a_clear_error(text: str) -> None:
    try:
        parse_cursor(text)
    except CursorError:
        pass
