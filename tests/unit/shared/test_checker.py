"""The lossless checker: pure checks over plain data, and the storage loader over small fakes."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.keys import Keys
from tools.checker import (
    LRANGE_CHUNK,
    MYSQL_MESSAGES,
    Ack,
    Copy,
    Report,
    Unacked,
    check_delivery,
    check_storage,
    stored_ids,
    stored_messages,
)


def acks(room: str, *offsets: int) -> list[Ack]:
    return [Ack(room, f"{room}:{o}", f"0-{o}", f"{room}-k{o}", o, "alice", f"body {o}") for o in offsets]


def got(room: str, *offsets: int, source: str = "") -> list[Copy]:
    """The copies of what `acks` acknowledged, as they were sent."""
    return [Copy(f"{room}:{o}", f"0-{o}", "alice", f"body {o}", o, f"{room}-k{o}", source) for o in offsets]


def stored(room: str, *offsets: int, source: str = "redis") -> list[Copy]:
    return got(room, *offsets, source=source)


# --- Report
def test_report_line_and_ok() -> None:
    assert str(Report()) == "lost=0 duplicated=0 out_of_order=0 unexpected=0 changed=0"
    assert Report().ok
    r = Report()
    r.count("lost", "a")
    r.count("duplicated", "b", 2)
    assert not r.ok
    assert str(r) == "lost=1 duplicated=2 out_of_order=0 unexpected=0 changed=0 e.g. lost:a duplicated:b"
    r = Report()
    r.count("changed", "c")
    assert not r.ok


def test_report_keeps_a_few_examples_and_adds_up() -> None:
    a, b = Report(), Report()
    for i in range(20):
        a.count("lost", f"x{i}")
    b.count("lost", "y")
    b.count("unexpected", "z")
    b.count("changed", "w")
    total = a + b
    assert (total.lost, total.unexpected, total.changed) == (21, 1, 1)
    assert total.examples == {"lost": ["x0", "x1", "x2", "x3", "x4"], "unexpected": ["z"], "changed": ["w"]}
    assert "\n" not in str(total)


# --- delivery
def unacked(room: str, o: int, outcome: str = "timeout") -> Unacked:
    return Unacked(room, "alice", f"{room}-k{o}", f"body {o}", outcome)


def test_a_send_without_an_ack_may_be_delivered_once_in_its_room_but_is_not_owed() -> None:
    given_up = [unacked("r", 2)]
    joined = {"s1": {"r": "", "q": ""}, "s2": {"r": ""}}
    received = {"s1": {"r": got("r", 1, 2, 3)}, "s2": {"r": got("r", 1, 3)}}
    assert check_delivery({"a": acks("r", 1, 3)}, received, joined, unacked=given_up).ok
    assert check_delivery({"a": acks("r", 1, 3)}, received, joined).unexpected == 1
    twice = {"s1": {"r": got("r", 1, 2, 2, 3)}}
    assert check_delivery({"a": acks("r", 1, 3)}, twice, joined, unacked=given_up).duplicated == 1
    elsewhere = {"s1": {"q": [replace(got("r", 2)[0])]}}
    assert check_delivery({"a": acks("r", 1, 3)}, elsewhere, {"s1": {"q": ""}}, unacked=given_up).unexpected == 1


def test_a_send_without_an_ack_under_two_ids_is_a_duplicate_and_with_another_body_changed() -> None:
    given_up = [unacked("r", 2, "unavailable")]
    [copy] = got("r", 2)
    again = replace(copy, id="r:2-again", cursor="0-4")
    report = check_delivery({"a": acks("r", 1)}, {"s1": {"r": [*got("r", 1), copy]}, "s2": {"r": [again]}},
                            {"s1": {"r": ""}, "s2": {"r": ""}}, unacked=given_up)
    assert (report.duplicated, report.examples["duplicated"]) == (1, ["r:2"])
    report = check_delivery({"a": acks("r", 1)}, {"s1": {"r": [replace(copy, body="other")]}}, {"s1": {"r": ""}},
                            unacked=given_up)
    assert (report.changed, report.duplicated, report.unexpected) == (1, 0, 0)


def test_a_send_refused_then_acked_on_a_retry_is_acked() -> None:
    report = check_delivery({"a": acks("r", 1)}, {"s1": {"r": got("r", 1)}}, {"s1": {"r": ""}},
                            unacked=[unacked("r", 1, "unavailable")])
    assert report.ok, report


def test_an_acked_send_delivered_under_another_id_too_is_a_duplicate() -> None:
    [copy] = got("r", 1)
    received = {"s1": {"r": [copy, replace(copy, id="r:1-twin", cursor="0-2")]}}
    report = check_delivery({"a": acks("r", 1)}, received, {"s1": {"r": ""}})
    assert (report.duplicated, report.examples["duplicated"], report.unexpected) == (1, ["r:1-twin"], 0)


@pytest.mark.parametrize("change", [{"body": "BODY 1"}, {"user": "mallory"}, {"ts": 99}, {"cmid": "other"},
                                    {"cursor": "0-7"}])
def test_a_copy_unlike_its_ack_is_changed(change: dict[str, Any]) -> None:
    [copy] = got("r", 1)
    report = check_delivery({"a": acks("r", 1)}, {"s1": {"r": [replace(copy, **change)]}}, {"s1": {"r": ""}})
    assert (report.changed, report.examples["changed"], report.lost) == (1, ["r:1"], 0)


def test_everything_delivered_once_in_order_is_ok() -> None:
    report = check_delivery({"alice": acks("r", 1, 2, 3)}, {"s1": {"r": got("r", 1, 2, 3)}}, {"s1": {"r": ""}})
    assert report.ok, report


def test_a_missing_message_is_lost() -> None:
    report = check_delivery({"alice": acks("r", 1, 2, 3)}, {"s1": {"r": got("r", 1, 3)}}, {"s1": {"r": ""}})
    assert (report.lost, report.examples["lost"]) == (1, ["r:2"])


def test_a_subscriber_that_received_nothing_lost_everything() -> None:
    report = check_delivery({"alice": acks("r", 1, 2)}, {}, {"s1": {"r": ""}, "s2": {"r": "0-1"}})
    assert report.lost == 3


def test_only_messages_after_the_join_point_are_owed() -> None:
    report = check_delivery({"alice": acks("r", 5, 6, 7)}, {"s1": {"r": got("r", 7)}}, {"s1": {"r": "0-6"}})
    assert report.ok, report
    report = check_delivery({"alice": acks("r", 5, 6, 7)}, {"s1": {"r": got("r", 6, 7)}}, {"s1": {"r": "0-5"}})
    assert report.ok, report


def test_messages_before_the_join_point_may_still_arrive() -> None:
    report = check_delivery({"a": acks("r", 1, 2)}, {"s1": {"r": got("r", 1, 2)}}, {"s1": {"r": "0-1"}})
    assert report.ok, report


def test_a_resent_send_acked_twice_is_owed_once() -> None:
    twice = acks("r", 1) + acks("r", 1)
    report = check_delivery({"alice": twice}, {"s1": {"r": got("r", 1)}}, {"s1": {"r": ""}})
    assert report.ok, report


def test_acks_grouped_any_way_count_the_same() -> None:
    by_sender = {"alice": acks("r", 1) + acks("q", 2), "bob": acks("r", 3)}
    by_room = {"r": acks("r", 1, 3), "q": acks("q", 2)}
    received = {"s1": {"r": got("r", 1), "q": got("q", 2)}}
    expected = {"s1": {"r": "", "q": ""}}
    assert str(check_delivery(by_sender, received, expected)) == str(check_delivery(by_room, received, expected))


def test_each_extra_copy_is_a_duplicate() -> None:
    report = check_delivery({"a": acks("r", 1, 2)}, {"s1": {"r": got("r", 1, 1, 2, 1)}}, {"s1": {"r": ""}})
    assert (report.duplicated, report.lost, report.out_of_order) == (2, 0, 0)


def test_the_same_id_at_two_positions_is_a_duplicate() -> None:
    [copy] = got("r", 1)
    received = {"s1": {"r": [copy, replace(copy, cursor="0-2")]}}
    report = check_delivery({"a": acks("r", 1)}, received, {"s1": {"r": ""}})
    assert (report.duplicated, report.out_of_order) == (1, 0)


def test_a_duplicate_in_another_subscriber_is_not_one() -> None:
    received = {"s1": {"r": got("r", 1)}, "s2": {"r": got("r", 1)}}
    assert check_delivery({"a": acks("r", 1)}, received, {"s1": {"r": ""}, "s2": {"r": ""}}).ok


def test_going_back_is_out_of_order() -> None:
    report = check_delivery({"a": acks("r", 1, 2, 3)}, {"s1": {"r": got("r", 2, 1, 3)}}, {"s1": {"r": ""}})
    assert (report.out_of_order, report.examples["out_of_order"], report.lost) == (1, ["r:1"], 0)


def test_order_is_per_room() -> None:
    received = {"s1": {"r": got("r", 5), "q": got("q", 1)}}
    assert check_delivery({"a": acks("r", 5) + acks("q", 1)}, received, {"s1": {"r": "", "q": ""}}).ok


def test_an_unacked_message_is_unexpected() -> None:
    received = {"s1": {"r": [*got("r", 1), Copy("ghost", "0-9", "bob", "boo", 9, "g")]}}
    report = check_delivery({"a": acks("r", 1)}, received, {"s1": {"r": ""}})
    assert (report.unexpected, report.examples["unexpected"]) == (1, ["ghost"])


def test_a_message_of_another_room_is_unexpected() -> None:
    received = {"s1": {"r": got("r", 1) + got("q", 2)}}
    report = check_delivery({"a": acks("r", 1) + acks("q", 2)}, received, {"s1": {"r": ""}})
    assert (report.unexpected, report.lost) == (1, 0)


def test_a_room_the_subscriber_never_joined_is_unexpected() -> None:
    received = {"s1": {"r": got("r", 1), "q": got("q", 2)}}
    report = check_delivery({"a": acks("r", 1) + acks("q", 2)}, received, {"s1": {"r": ""}})
    assert (report.unexpected, report.lost) == (1, 0)


def test_since_and_until_bound_what_is_owed() -> None:
    sent = [replace(a, ts=a.ts * 1000) for a in acks("r", 1, 2, 3, 4, 5)]
    received = {"s1": {"r": [replace(c, ts=c.ts * 1000) for c in got("r", 3, 4)]}}
    assert check_delivery({"a": sent}, received, {"s1": {"r": ""}}, since=3000, until=5000).ok
    assert check_delivery({"a": sent}, received, {"s1": {"r": ""}}, since=3000).lost == 1
    assert check_delivery({"a": sent}, received, {"s1": {"r": ""}}).lost == 3


def test_ack_and_copy_from_frames() -> None:
    frame = {"type": "ack", "client_msg_id": "k", "id": "01J", "room": "r", "cursor": "3-9", "ts": 7}
    assert Ack.from_frame(frame, "ann", "hi") == Ack("r", "01J", "3-9", "k", 7, "ann", "hi")
    message = {"type": "message", "id": "01J", "room": "r", "user": "ann", "body": "hi", "ts": 7, "cursor": "3-9",
               "cmid": "k"}
    assert Copy.from_frame(message, "history") == Copy("01J", "3-9", "ann", "hi", 7, "k", "history")


@given(st.lists(st.booleans(), min_size=1, max_size=60), st.integers(0, 60))
def test_delivering_a_subsequence_in_order_loses_exactly_the_rest(kept: list[bool], join: int) -> None:
    offsets = range(1, len(kept) + 1)
    delivered = [o for o, keep in zip(offsets, kept, strict=True) if keep]
    report = check_delivery({"a": acks("r", *offsets)}, {"s": {"r": got("r", *delivered)}},
                            {"s": {"r": f"0-{join}"}})
    assert report.lost == sum(1 for o in offsets if o > join and o not in delivered)
    assert (report.duplicated, report.out_of_order, report.unexpected, report.changed) == (0, 0, 0, 0)


@given(st.lists(st.integers(1, 30), max_size=80))
def test_any_arrival_sequence_is_accounted(sequence: list[int]) -> None:
    report = check_delivery({"a": acks("r", *range(1, 31))}, {"s": {"r": got("r", *sequence)}}, {"s": {"r": ""}})
    assert report.duplicated == len(sequence) - len(set(sequence))
    assert report.lost == 30 - len(set(sequence))
    assert (report.unexpected, report.changed) == (0, 0)
    firsts = list(dict.fromkeys(sequence))
    assert (report.out_of_order == 0) == (firsts == sorted(firsts))


# --- storage
def test_stored_ids_counts_a_copy_in_both_stores_once() -> None:
    copies = [*stored("r", 1, source="mysql"), *stored("r", 1, 2, 2), *stored("r", 3, 3, source="mysql"),
              *stored("r", 3)]
    assert sorted(stored_ids(copies)) == ["r:1", "r:2", "r:2", "r:3", "r:3"]


def test_storage_clean() -> None:
    assert check_storage(acks("r", 1, 2), {"r": stored("r", 1, 2)}).ok


def test_storage_lost_duplicated_unexpected() -> None:
    ghost = Copy("ghost", "0-9", "bob", "boo", 9, "g", "redis")
    report = check_storage(acks("r", 1, 2, 3) + acks("q", 4),
                           {"r": [*stored("r", 1, 1, 1), *stored("r", 2), ghost], "q": []})
    assert (report.lost, report.duplicated, report.unexpected) == (2, 2, 1)
    assert report.examples == {"lost": ["q:4", "r:3"], "duplicated": ["r:1"], "unexpected": ["ghost"]}


def test_storage_in_the_wrong_room_is_lost_and_unexpected() -> None:
    report = check_storage(acks("r", 1), {"q": stored("r", 1)})
    assert (report.lost, report.unexpected, report.duplicated) == (1, 1, 0)


def test_storage_repeated_acks_are_one_message() -> None:
    assert check_storage(acks("r", 1) + acks("r", 1), {"r": stored("r", 1)}).ok


def test_storage_holds_every_copy_to_its_ack_and_each_store_to_cursor_order() -> None:
    [copy] = stored("r", 2, source="mysql")
    report = check_storage(acks("r", 1, 2), {"r": [*stored("r", 1, 2), replace(copy, body="edited")]})
    assert (report.changed, report.examples["changed"]) == (1, ["r:2"])
    swapped = check_storage(acks("r", 1, 2, 3), {"r": stored("r", 1, 3, 2)})
    assert (swapped.out_of_order, swapped.examples["out_of_order"], swapped.lost) == (1, ["r:2"], 0)
    # the stores one after the other: each is in order on its own
    assert check_storage(acks("r", 1, 2, 3), {"r": [*stored("r", 2, 3), *stored("r", 1, 2, source="mysql")]}).ok


def test_a_send_without_an_ack_may_be_stored_once_in_its_room_under_one_id_or_not_at_all() -> None:
    given_up = [unacked("r", 9)]
    [copy] = stored("r", 9)
    assert check_storage(acks("r", 1), {"r": [*stored("r", 1), copy]}, given_up).ok
    assert check_storage(acks("r", 1), {"r": stored("r", 1)}, given_up).ok
    assert check_storage(acks("r", 1), {"r": [*stored("r", 1), copy, copy]}, given_up).duplicated == 1
    twin = replace(copy, id="r:9-twin", cursor="0-10")
    assert check_storage(acks("r", 1), {"r": [*stored("r", 1), copy, twin]}, given_up).duplicated == 1
    assert check_storage(acks("r", 1), {"r": stored("r", 1), "q": [copy]}, given_up).unexpected == 1


@given(st.lists(st.sampled_from(["redis", "mysql", "both"]), max_size=50))
def test_every_message_in_either_store_or_both_is_stored_once(where: list[str]) -> None:
    copies = [c for s in ("redis", "mysql") for i, w in enumerate(where) if w in (s, "both")
              for c in stored("r", i, source=s)]
    assert check_storage(acks("r", *range(len(where))), {"r": copies}).ok


# --- the loader
Row = tuple[str, int, int, str, str, int, str, bool, bool]


class FakeRedis:
    """LRANGE with Redis' index rules; `on_read` runs after each call (a mover at work)."""

    def __init__(self, items: list[bytes]) -> None:
        self.items = items
        self.calls: list[Row] = []
        self.on_read: Any = None

    async def lrange(self, key: str, start: int, end: int) -> list[bytes]:
        self.calls.append((key, start, end))
        n = len(self.items)
        start, end = max(start + n if start < 0 else start, 0), min(end + n if end < 0 else end, n - 1)
        page = self.items[start:end + 1] if start <= end else []
        if self.on_read is not None:
            self.on_read()
        return page


class FakeCursor:
    def __init__(self, rows: list[Row], log: list[tuple[str, tuple[str, ...]]]) -> None:
        self.rows, self.log = rows, log

    async def __aenter__(self) -> FakeCursor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def execute(self, sql: str, params: tuple[str, ...]) -> None:
        self.log.append((sql, params))

    async def fetchall(self) -> list[Row]:
        return list(self.rows)


class FakePool:
    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.log: list[tuple[str, tuple[str, ...]]] = []

    def acquire(self) -> FakePool:
        return self

    async def __aenter__(self) -> FakePool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def cursor(self) -> FakeCursor:
        return FakeCursor(self.rows, self.log)


def entry(i: int) -> bytes:
    return orjson.dumps({"id": f"m{i}", "room": "r", "user": "u", "body": "b", "ts": i, "cursor": f"2-{i}",
                         "cmid": f"k{i}"})


def row(i: int) -> Row:
    """A MySQL row of `entry(i)`: id, partition, offset, user, body, ts, client_msg_id, edited, deleted."""
    return (f"m{i}", 2, i, "u", "b", i, f"k{i}", False, False)


async def test_stored_messages_reads_redis_in_chunks_then_mysql() -> None:
    keys = Keys("rc", 4)
    redis, pool = FakeRedis([entry(i) for i in range(1200, 2300)]), FakePool()
    pool.rows = [row(i) for i in range(1000, 1250)]  # 1200..1249 in both stores
    copies = await stored_messages(redis, pool, keys, "r")
    assert all(key == keys.msgs("r") and end - start + 1 <= LRANGE_CHUNK for key, start, end in redis.calls)
    assert copies[:1100] == [Copy(f"m{i}", f"2-{i}", "u", "b", i, f"k{i}", "redis") for i in range(1200, 2300)]
    assert copies[1100:] == [Copy(f"m{i}", f"2-{i}", "u", "b", i, f"k{i}", "mysql") for i in range(1000, 1250)]
    assert pool.log == [(MYSQL_MESSAGES, ("r",))]
    assert sorted(stored_ids(copies)) == sorted(f"m{i}" for i in range(1000, 2300))


async def test_stored_messages_misses_nothing_while_a_mover_trims_the_head() -> None:
    redis, pool = FakeRedis([entry(i) for i in range(1300)]), FakePool()

    def move_oldest() -> None:  # insert first, then trim: the mover's order
        chunk, redis.items = redis.items[:100], redis.items[100:]
        pool.rows += [row(orjson.loads(e)["ts"]) for e in chunk]

    redis.on_read = move_oldest
    copies = await stored_messages(redis, pool, Keys("rc", 4), "r")
    sent = [Ack("r", f"m{i}", f"2-{i}", f"k{i}", i, "u", "b") for i in range(1300)]
    assert check_storage(sent, {"r": copies}).ok


async def test_stored_messages_of_an_empty_room() -> None:
    assert await stored_messages(FakeRedis([]), FakePool(), Keys("rc", 4), "r") == []
