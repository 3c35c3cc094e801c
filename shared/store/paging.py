"""Pure paging over a room's two stores: which entries a page or a resume range holds, what to ask
MySQL, and how to stitch its answer to the Redis run. History pages and resumes both use it.

A room's Redis list is a contiguous suffix of the room (everything older than its head is already
in MySQL: the mover inserts before it trims). So the `limit` newest entries with after < offset <
before (history: no `after`; resume: the client's cursor) are read as:

1. from Redis, atomically: the up to `limit + 1` newest list entries in the range (a *run*, oldest
   first), and whether that run starts at the list's head or reached `after` (buffer.read_run);
2. if the run is cut by the window, reached `after`, or holds more than `limit` messages, the page
   is its newest `limit` and MySQL is not asked;
3. otherwise MySQL fills in what is older than the run: `after < offset < X ORDER BY offset DESC
   LIMIT n` with X the run's oldest offset (`before` when the run is empty) and n one more than the
   page still needs, so the answer also tells whether anything older exists.

Pages cover disjoint offset ranges (a page holds every message in [its oldest, before)), so paging
back returns each message once. A message briefly in both stores (crash between insert and trim)
is read from one side only, and ids are deduplicated within a page, the first position winning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

import orjson

from shared.cursor import CursorError, parse_cursor
from shared.errors import BadRequest, Err
from shared.store.entry import Entry, dedupe

NO_BOUND = -1  # `after` of a page with no lower bound (offsets start at 0)


class RunEnd(IntEnum):
    """How a Redis run (buffer.read_run) ends at its old side."""

    MORE = 0  # older list entries in range precede it: the window cut it
    HEAD = 1  # it starts at the list's head: older entries, if any, are in MySQL
    AFTER = 2  # entries at or below `after` precede it: nothing older is wanted


def resolve_limit(limit: int | None, default: int, maximum: int) -> int:
    """The page size: `default` when absent, capped at `maximum`; below 1 is refused."""
    if limit is None:
        return min(default, maximum)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise BadRequest(Err.BAD_FRAME, "limit must be a positive integer")
    return min(limit, maximum)


def resolve_before(before: str | None, partition: int) -> int | None:
    """The exclusive offset bound of the page (None: the newest page). The cursor must belong to
    the room's partition; '' or None means the newest page."""
    if not before:
        return None
    try:
        pos = parse_cursor(before)
    except CursorError as e:
        raise BadRequest(Err.BAD_CURSOR, str(e)) from None
    if pos is None or pos.partition != partition:
        raise BadRequest(Err.BAD_CURSOR, f"cursor {before!r} does not belong to this room")
    return pos.offset


@dataclass(frozen=True, slots=True)
class Page:
    entries: list[Entry]  # oldest first
    next: str | None  # cursor for the next older page; None when nothing older is in range

    def body(self, room: str, frame: bool) -> bytes:
        """The JSON of the page, joined from the stored entries (not re-encoded)."""
        head = b'{"type":"history","room":' if frame else b'{"room":'
        return (head + orjson.dumps(room) + b',"messages":[' + b",".join(e.raw for e in self.entries)
                + b'],"next":' + orjson.dumps(self.next) + b"}")


@dataclass(frozen=True, slots=True)
class MysqlNeed:
    """Ask MySQL for the `count` newest messages with after < offset < before (None: no bound)."""

    before: int | None
    count: int
    after: int = NO_BOUND


EMPTY = Page([], None)


def make_page(entries: Sequence[Entry], limit: int, older: bool) -> Page:
    """The newest `limit` of `entries` (oldest first); `older`: something older than `entries`
    is known to exist in range."""
    page = list(entries[-limit:]) if limit else []
    has_older = older or len(entries) > limit
    return Page(page, page[0].cursor if has_older and page else None)


def plan(before: int | None, run: Sequence[Entry], at_head: bool | RunEnd, limit: int,
         after: int = NO_BOUND) -> Page | MysqlNeed:
    """Decide from the Redis run alone, or say what MySQL must add.

    `run`: the newest entries of the list with after < offset < `before`, oldest first, contiguous
    in the list and ending right before `before`; `at_head`: how it ends (a bool: HEAD or MORE).
    """
    end = RunEnd(int(at_head))
    if before is not None and before <= after + 1:
        return EMPTY
    uniq = dedupe(run)
    if end is RunEnd.AFTER:
        return make_page(uniq, limit, older=False)
    if end is RunEnd.MORE:
        # Older entries exist in Redis: never skip them for MySQL (that would leave a gap). A run of
        # limit + 1 always fills the page; a shorter one only when ids repeated inside the run.
        return make_page(uniq, limit, older=True)
    if len(uniq) > limit:
        return make_page(uniq, limit, older=True)
    return MysqlNeed(run[0].offset if run else before, limit - len(uniq) + 1, after)


def stitch(run: Sequence[Entry], older_desc: Sequence[Entry], need: MysqlNeed, limit: int) -> Page:
    """The page from the Redis run and MySQL's answer to `need` (newest first, all older than
    the run)."""
    combined = dedupe([*reversed(older_desc), *run])
    return make_page(combined, limit, older=len(older_desc) >= need.count)


def log_start(after: int, mark: int | None) -> int:
    """Where a resume reads the log when the persister applied the partition only up to `mark`
    (None: never): past both what the client has and what storage has."""
    return max(after, NO_BOUND if mark is None else mark) + 1
