"""Pure history paging: stitching the Redis run with MySQL, against a model of the two stores."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import BadRequest
from shared.store.entry import Entry
from shared.store.entry import parse as parse_entry
from shared.store.paging import (
    EMPTY,
    MysqlNeed,
    Page,
    plan,
    resolve_before,
    resolve_limit,
    stitch,
)


def entry(off: int, mid: str | None = None) -> Entry:
    mid = mid or f"m{off}"
    raw = orjson.dumps({"id": mid, "cursor": f"2-{off}"})
    return Entry(off, mid, f"2-{off}", raw)


class Stores:
    """A room split between MySQL (a prefix, possibly overlapping) and a Redis list (the rest)."""

    def __init__(self, offsets: list[int], redis_from: int, mysql_upto: int) -> None:
        self.room = [entry(o) for o in offsets]
        self.redis = self.room[redis_from:]
        self.mysql = self.room[:max(mysql_upto, redis_from)]
        self.mysql_queries = 0

    def read_run(self, bound: int | None, w: int) -> tuple[list[Entry], bool]:
        """What READ_RUN returns: the up to w newest list entries below bound, and at_head."""
        hi = len(self.redis) if bound is None else sum(1 for e in self.redis if e.offset < bound)
        start = max(hi - w, 0)
        return self.redis[start:hi], start == 0

    def older(self, need: MysqlNeed) -> list[Entry]:
        self.mysql_queries += 1
        rows = [e for e in self.mysql if need.before is None or e.offset < need.before]
        return list(reversed(rows))[:need.count]

    def move(self, n: int) -> None:
        """A mover: insert the oldest n list entries into MySQL, then trim them."""
        chunk, self.redis = self.redis[:n], self.redis[n:]
        known = {e.id for e in self.mysql}
        self.mysql = sorted(self.mysql + [e for e in chunk if e.id not in known], key=lambda e: e.offset)

    def page(self, bound: int | None, limit: int, move_between: int = 0) -> Page:
        run, at_head = self.read_run(bound, limit + 1)
        self.move(move_between)  # a mover may run between the Redis read and the MySQL read
        decision = plan(bound, run, at_head, limit)
        if isinstance(decision, Page):
            return decision
        return stitch(run, self.older(decision), decision, limit)


def page_back(stores: Stores, limit: int, moves: list[int] | None = None) -> list[list[int]]:
    pages: list[list[int]] = []
    bound: int | None = None
    for i in range(len(stores.room) + 2):
        if moves:
            stores.move(moves[i % len(moves)])
        page = stores.page(bound, limit, moves[(i + 1) % len(moves)] if moves else 0)
        pages.append([e.offset for e in page.entries])
        if page.next is None:
            return pages
        assert page.next == page.entries[0].cursor
        bound = page.entries[0].offset
    raise AssertionError("paging did not end")


room_shapes = st.lists(st.integers(1, 5), min_size=0, max_size=120).flatmap(
    lambda gaps: st.tuples(
        st.just([sum(gaps[:i + 1]) for i in range(len(gaps))]),
        st.integers(0, len(gaps)),
        st.integers(0, len(gaps)),
    )
)


@settings(max_examples=300, deadline=None)
@given(room_shapes, st.integers(1, 30))
def test_paging_back_returns_every_message_once_in_order(shape: tuple[list[int], int, int], limit: int) -> None:
    offsets, redis_from, mysql_upto = shape
    pages = page_back(Stores(offsets, redis_from, mysql_upto), limit)
    flat = [o for p in reversed(pages) for o in p]
    assert flat == offsets
    assert all(len(p) == limit for p in pages[:-1])  # only the last (oldest) page may be short
    assert all(p == sorted(p) for p in pages)


@settings(max_examples=200, deadline=None)
@given(room_shapes, st.integers(1, 30), st.lists(st.integers(0, 40), min_size=1, max_size=5))
def test_paging_survives_movers_trimming_meanwhile(shape: tuple[list[int], int, int], limit: int,
                                                       moves: list[int]) -> None:
    offsets, redis_from, mysql_upto = shape
    pages = page_back(Stores(offsets, redis_from, mysql_upto), limit, moves)
    assert [o for p in reversed(pages) for o in p] == offsets


@settings(max_examples=200, deadline=None)
@given(room_shapes, st.integers(1, 30))
def test_first_page_skips_mysql_when_the_list_holds_more_than_a_page(shape: tuple[list[int], int, int],
                                                                    limit: int) -> None:
    offsets, redis_from, mysql_upto = shape
    stores = Stores(offsets, redis_from, mysql_upto)
    stores.page(None, limit)
    assert stores.mysql_queries == (0 if len(stores.redis) > limit else 1)


def test_straddling_page_takes_the_older_part_from_mysql() -> None:
    stores = Stores(list(range(10, 30)), redis_from=15, mysql_upto=15)  # Redis 25..29, MySQL 10..24
    page = stores.page(None, 8)
    assert [e.offset for e in page.entries] == list(range(22, 30))
    assert page.next == "2-22"
    assert stores.mysql_queries == 1


def test_message_in_both_stores_appears_once() -> None:
    stores = Stores(list(range(20)), redis_from=12, mysql_upto=16)  # 12..15 in both
    pages = page_back(stores, 5)
    assert [o for p in reversed(pages) for o in p] == list(range(20))


def test_same_id_at_two_offsets_is_shown_once_at_its_first_position() -> None:
    run = [entry(5, "a"), entry(6, "b"), entry(7, "a"), entry(8, "c")]  # a producer-retry copy at 7
    decision = plan(None, run, at_head=True, limit=10)
    assert isinstance(decision, MysqlNeed)
    page = stitch(run, [], decision, 10)
    assert [e.offset for e in page.entries] == [5, 6, 8]
    assert page.next is None


def test_short_run_not_at_head_never_skips_older_redis_entries() -> None:
    run = [entry(5, "a"), entry(6, "a"), entry(7, "b")]  # w = 3 but only two distinct ids
    page = plan(None, run, at_head=False, limit=2)
    assert isinstance(page, Page)
    assert [e.offset for e in page.entries] == [5, 7]
    assert page.next == "2-5"


def test_bound_at_or_below_zero_is_an_empty_last_page() -> None:
    assert plan(0, [], True, 10) is EMPTY
    assert plan(-1, [], True, 10) is EMPTY


def test_full_page_at_head_asks_mysql_only_whether_older_exists() -> None:
    run = [entry(o) for o in range(5, 8)]
    need = plan(None, run, at_head=True, limit=3)
    assert need == MysqlNeed(5, 1)
    assert stitch(run, [], need, 3).next is None
    older = stitch(run, [entry(4)], need, 3)  # MySQL has one more: next is set
    assert [e.offset for e in older.entries] == [5, 6, 7]
    assert older.next == "2-5"


def test_resolve_limit() -> None:
    assert resolve_limit(None, 50, 200) == 50
    assert resolve_limit(7, 50, 200) == 7
    assert resolve_limit(10_000, 50, 200) == 200
    assert resolve_limit(None, 500, 200) == 200
    for bad in (0, -3, True):
        with pytest.raises(BadRequest):
            resolve_limit(bad, 50, 200)


def test_resolve_before() -> None:
    assert resolve_before(None, 2) is None
    assert resolve_before("", 2) is None
    assert resolve_before("2-1842", 2) == 1842
    assert resolve_before("2-start", 2) == -1
    assert resolve_before("2--1", 2) == -1
    for bad in ("x", "2-", "-5", "2-a", "3-5", "2-5-6", "9" * 50):
        with pytest.raises(BadRequest) as e:
            resolve_before(bad, 2)
        assert e.value.code == "bad_cursor"


def test_page_body_joins_stored_json() -> None:
    page = Page([entry(1), entry(2)], "2-1")
    assert orjson.loads(page.body("r1", frame=True)) == {
        "type": "history", "room": "r1", "next": "2-1",
        "messages": [{"id": "m1", "cursor": "2-1"}, {"id": "m2", "cursor": "2-2"}]}
    assert orjson.loads(Page([], None).body("r1", frame=False)) == {"room": "r1", "messages": [], "next": None}


def test_parse_entry() -> None:
    raw = orjson.dumps({"id": "X", "room": "r", "user": "u", "body": "b", "ts": 1, "cursor": "3-77", "cmid": ""})
    e = parse_entry(raw)
    assert (e.offset, e.id, e.cursor, e.raw) == (77, "X", "3-77", raw)
