"""Positions and the opaque cursor strings clients see.

A message's position is the (partition, offset) of its first copy in Kafka. A room lives in one
partition, so within a room positions are ordered by offset. Cursors look like "3-1842"; "" means
"from now".
"""

from __future__ import annotations

from typing import NamedTuple


class CursorError(ValueError):
    """A cursor string that is not of the form '<partition>-<offset>'."""


class Position(NamedTuple):
    partition: int
    offset: int

    def __str__(self) -> str:
        return f"{self.partition}-{self.offset}"


def parse_cursor(text: str) -> Position | None:
    """'' -> None (from now); '3-1842' -> Position(3, 1842); '3--1' is before the partition's first
    record; anything else raises CursorError."""
    if text == "":
        return None
    part, sep, off = text.partition("-")
    if (len(text) > 40 or not text.isascii() or not sep or not part.isdigit()
            or not (off.isdigit() or off == "-1")):
        raise CursorError(f"bad cursor {text!r}")
    return Position(int(part), int(off))
