"""Positions and the opaque cursor strings clients see.

A message's position is the (partition, offset) of its first copy in Kafka. A room lives in one
partition, so within a room positions are ordered by offset. Cursors look like "3-1842"; a join
point before a partition's first record is "3-start"; "" means "from now".
"""

from __future__ import annotations

from typing import NamedTuple

START = "start"  # the offset part of the cursor before a partition's first record (offset -1)


class CursorError(ValueError):
    """A cursor string that is not of the form '<partition>-<offset>' or '<partition>-start'."""


class Position(NamedTuple):
    partition: int
    offset: int  # -1: before the partition's first record

    def __str__(self) -> str:
        return f"{self.partition}-{START if self.offset == -1 else self.offset}"


def join_point(partition: int, next_offset: int) -> str:
    """The cursor of a join at `next_offset` (the next record to be delivered): the record before it."""
    return str(Position(partition, next_offset - 1))


def parse_cursor(text: str) -> Position | None:
    """'' -> None (from now); '3-1842' -> Position(3, 1842); '3-start' -> Position(3, -1), before the
    partition's first record (so is '3--1', the form servers issued before 'start': clients keep
    cursors); anything else raises CursorError."""
    if text == "":
        return None
    part, sep, off = text.partition("-")
    if (len(text) > 40 or not text.isascii() or not sep or not part.isdigit()
            or not (off.isdigit() or off in (START, "-1"))):
        raise CursorError(f"bad cursor {text!r}")
    return Position(int(part), -1 if off == START else int(off))
