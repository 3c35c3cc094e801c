"""Pure decisions behind a history page: parsing the request, and stitching Redis with MySQL.

A room's Redis list is a contiguous suffix of the room (everything older than its head is already
in MySQL: the mover inserts before it trims). So a page of the `limit` newest messages before a
cursor B is built as:

1. from Redis, atomically: the up to `limit + 1` newest entries with offset < B (a *run*, oldest
   first), and whether that run starts at the list's head;
2. if the run does not reach the head, or holds more than `limit` messages, the page is its newest
   `limit` and MySQL is not asked;
3. otherwise MySQL fills in what is older than the run: `offset < X ORDER BY offset DESC LIMIT n`
   with X the run's oldest offset (B when the run is empty) and n one more than the page still
   needs, so the answer also tells whether anything older exists.

Pages cover disjoint offset ranges (a page holds every message in [its oldest, B)), so paging back
returns each message once. A message briefly in both stores (crash between insert and trim) is read
from one side only, and ids are deduplicated within a page, the first position winning.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import orjson

from gateway.protocol import Err
from shared.cursor import CursorError, parse_cursor


class HistoryError(Exception):
    """A page that cannot be served; `code` is the wire error code."""

    status = 500  # the REST answer

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


class BadRequest(HistoryError):
    """Bad cursor, limit or room."""

    status = 400


class Unavailable(HistoryError):
    """The page needs a store that does not answer (MySQL down, Redis down)."""

    status = 503

    def __init__(self, reason: str) -> None:
        super().__init__(Err.UNAVAILABLE, reason)


@dataclass(frozen=True, slots=True)
class Entry:
    """A stored entry (its JSON, as kept in Redis) with what paging needs from it."""

    offset: int
    id: str
    cursor: str
    raw: bytes


def parse_entry(raw: bytes) -> Entry:
    d = orjson.loads(raw)
    cursor = d["cursor"]
    return Entry(int(cursor.rpartition("-")[2]), d["id"], cursor, raw)


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


def dedupe(entries: Iterable[Entry]) -> list[Entry]:
    """Entries (oldest first) without repeated ids; the first (oldest) position wins."""
    seen: set[str] = set()
    out: list[Entry] = []
    for e in entries:
        if e.id not in seen:
            seen.add(e.id)
            out.append(e)
    return out


@dataclass(frozen=True, slots=True)
class Page:
    entries: list[Entry]  # oldest first
    next: str | None  # cursor for the next older page; None when nothing is older

    def body(self, room: str, frame: bool) -> bytes:
        """The JSON of the page, joined from the stored entries (not re-encoded)."""
        head = b'{"type":"history","room":' if frame else b'{"room":'
        return (head + orjson.dumps(room) + b',"messages":[' + b",".join(e.raw for e in self.entries)
                + b'],"next":' + orjson.dumps(self.next) + b"}")


@dataclass(frozen=True, slots=True)
class MysqlNeed:
    """Ask MySQL for the `count` newest messages with offset < `before` (None: no bound)."""

    before: int | None
    count: int


EMPTY = Page([], None)


def make_page(entries: Sequence[Entry], limit: int, older: bool) -> Page:
    """The newest `limit` of `entries` (oldest first); `older`: something older than `entries`
    is known to exist."""
    page = list(entries[-limit:]) if limit else []
    has_older = older or len(entries) > limit
    return Page(page, page[0].cursor if has_older and page else None)


def plan(before: int | None, run: Sequence[Entry], at_head: bool, limit: int) -> Page | MysqlNeed:
    """Decide from the Redis run alone, or say what MySQL must add.

    `run`: the newest entries of the list with offset < `before`, oldest first, contiguous in the
    list and ending right before `before`; `at_head`: the run starts at the list's first entry.
    """
    if before is not None and before <= 0:
        return EMPTY
    uniq = dedupe(run)
    if not at_head:
        # Older entries exist in Redis: never skip them for MySQL (that would leave a gap). A run of
        # limit + 1 always fills the page; a shorter one only when ids repeated inside the run.
        return make_page(uniq, limit, older=True)
    if len(uniq) > limit:
        return make_page(uniq, limit, older=True)
    return MysqlNeed(run[0].offset if run else before, limit - len(uniq) + 1)


def stitch(run: Sequence[Entry], older_desc: Sequence[Entry], need: MysqlNeed, limit: int) -> Page:
    """The page from the Redis run and MySQL's answer to `need` (newest first, all older than
    the run)."""
    combined = dedupe([*reversed(older_desc), *run])
    return make_page(combined, limit, older=len(older_desc) >= need.count)
