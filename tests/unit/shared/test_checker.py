"""The lossless checker: pure checks over plain data, and the storage loader over small fakes."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st

from shared.keys import Keys
from tools.checker import (
    LRANGE_CHUNK,
    MYSQL_MESSAGES,
    Ack,
    Report,
    check_delivery,
    check_storage,
    stored_ids,
    stored_messages,
)


def acks(room: str, *offsets: int, ts: int = 0) -> list[Ack]:
    return [Ack(room, f"{room}:{o}", f"0-{o}", f"k{o}", ts or o) for o in offsets]


def got(room: str, *offsets: int) -> list[tuple[str, str]]:
    return [(f"{room}:{o}", f"0-{o}") for o in offsets]


# --- Report
def test_report_line_and_ok() -> None:
    assert str(Report()) == "lost=0 duplicated=0 out_of_order=0 unexpected=0"
    assert Report().ok
    r = Report()
    r.count("lost", "a")
    r.count("duplicated", "b", 2)
    assert not r.ok
    assert str(r) == "lost=1 duplicated=2 out_of_order=0 unexpected=0 e.g. lost:a duplicated:b"


def test_report_keeps_a_few_examples_and_adds_up() -> None:
    a, b = Report(), Report()
    for i in range(20):
        a.count("lost", f"x{i}")
    b.count("lost", "y")
    b.count("unexpected", "z")
    total = a + b
    assert (total.lost, total.unexpected) == (21, 1)
    assert total.examples == {"lost": ["x0", "x1", "x2", "x3", "x4"], "unexpected": ["z"]}
    assert "\n" not in str(total)


# --- delivery
def test_a_send_given_up_on_may_be_delivered_once_in_its_room_but_is_not_owed() -> None:
    maybe = {"r:2": "r"}
    joined = {"s1": {"r": "", "q": ""}, "s2": {"r": ""}}
    received = {"s1": {"r": got("r", 1, 2, 3)}, "s2": {"r": got("r", 1, 3)}}
    assert check_delivery({"a": acks("r", 1, 3)}, received, joined, maybe=maybe).ok
    assert check_delivery({"a": acks("r", 1, 3)}, received, joined).unexpected == 1
    twice = {"s1": {"r": got("r", 1, 2, 2, 3)}}
    assert check_delivery({"a": acks("r", 1, 3)}, twice, joined, maybe=maybe).duplicated == 1
    elsewhere = {"s1": {"q": got("r", 2)}}
    assert check_delivery({"a": acks("r", 1, 3)}, elsewhere, {"s1": {"q": ""}}, maybe=maybe).unexpected == 1


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
    received = {"s1": {"r": [("r:1", "0-1"), ("r:1", "0-2")]}}
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
    received = {"s1": {"r": [*got("r", 1), ("ghost", "0-9")]}}
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
    sent = [Ack("r", f"m{t}", f"0-{t}", ts=t * 1000) for t in range(1, 6)]
    received = {"s1": {"r": [("m3", "0-3"), ("m4", "0-4")]}}
    assert check_delivery({"a": sent}, received, {"s1": {"r": ""}}, since=3000, until=5000).ok
    assert check_delivery({"a": sent}, received, {"s1": {"r": ""}}, since=3000).lost == 1
    assert check_delivery({"a": sent}, received, {"s1": {"r": ""}}).lost == 3


def test_ack_from_frame() -> None:
    frame = {"type": "ack", "client_msg_id": "k", "id": "01J", "room": "r", "cursor": "3-9", "ts": 7}
    assert Ack.from_frame(frame) == Ack("r", "01J", "3-9", "k", 7)


@given(st.lists(st.booleans(), min_size=1, max_size=60), st.integers(0, 60))
def test_delivering_a_subsequence_in_order_loses_exactly_the_rest(kept: list[bool], join: int) -> None:
    offsets = range(1, len(kept) + 1)
    delivered = [o for o, keep in zip(offsets, kept, strict=True) if keep]
    report = check_delivery({"a": acks("r", *offsets)}, {"s": {"r": got("r", *delivered)}},
                            {"s": {"r": f"0-{join}"}})
    assert report.lost == sum(1 for o in offsets if o > join and o not in delivered)
    assert (report.duplicated, report.out_of_order, report.unexpected) == (0, 0, 0)


@given(st.lists(st.integers(1, 30), max_size=80))
def test_any_arrival_sequence_is_accounted(sequence: list[int]) -> None:
    report = check_delivery({"a": acks("r", *range(1, 31))}, {"s": {"r": got("r", *sequence)}}, {"s": {"r": ""}})
    assert report.duplicated == len(sequence) - len(set(sequence))
    assert report.lost == 30 - len(set(sequence))
    assert report.unexpected == 0
    firsts = list(dict.fromkeys(sequence))
    assert (report.out_of_order == 0) == (firsts == sorted(firsts))


# --- storage
def test_stored_ids_counts_a_copy_in_both_stores_once() -> None:
    stored = [("a", "0-1", "mysql"), ("a", "0-1", "redis"), ("b", "0-2", "redis"), ("b", "0-2", "redis"),
              ("c", "0-3", "mysql"), ("c", "0-3", "mysql"), ("c", "0-3", "redis")]
    assert sorted(stored_ids(stored)) == ["a", "b", "b", "c", "c"]


def test_storage_clean() -> None:
    assert check_storage({"r": ["a", "b"]}, {"r": ["a", "b"]}).ok


def test_storage_lost_duplicated_unexpected() -> None:
    report = check_storage({"r": ["a", "b", "c"], "q": ["x"]}, {"r": ["a", "a", "a", "b", "z"], "q": []})
    assert (report.lost, report.duplicated, report.unexpected) == (2, 2, 1)
    assert report.examples == {"lost": ["x", "c"], "duplicated": ["a"], "unexpected": ["z"]}


def test_storage_in_the_wrong_room_is_lost_and_unexpected() -> None:
    report = check_storage({"r": ["a"]}, {"q": ["a"]})
    assert (report.lost, report.unexpected, report.duplicated) == (1, 1, 0)


def test_storage_repeated_acks_are_one_message() -> None:
    assert check_storage({"r": ["a", "a"]}, {"r": ["a"]}).ok


def test_a_send_given_up_on_may_be_stored_once_in_its_room_or_not_at_all() -> None:
    maybe = {"g": "r"}
    assert check_storage({"r": ["a"]}, {"r": ["a", "g"]}, maybe).ok
    assert check_storage({"r": ["a"]}, {"r": ["a"]}, maybe).ok
    assert check_storage({"r": ["a"]}, {"r": ["a", "g", "g"]}, maybe).duplicated == 1
    assert check_storage({"r": ["a"], "q": []}, {"r": ["a"], "q": ["g"]}, maybe).unexpected == 1


@given(st.lists(st.sampled_from(["redis", "mysql", "both"]), max_size=50))
def test_every_message_in_either_store_or_both_is_stored_once(where: list[str]) -> None:
    stored = [(f"m{i}", f"0-{i}", s) for i, w in enumerate(where) for s in ("redis", "mysql") if w in (s, "both")]
    assert check_storage({"r": [f"m{i}" for i in range(len(where))]}, {"r": stored_ids(stored)}).ok


# --- the loader
class FakeRedis:
    """LRANGE with Redis' index rules; `on_read` runs after each call (a mover at work)."""

    def __init__(self, items: list[bytes]) -> None:
        self.items = items
        self.calls: list[tuple[str, int, int]] = []
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
    def __init__(self, rows: list[tuple[str, int, int]], log: list[tuple[str, tuple[str, ...]]]) -> None:
        self.rows, self.log = rows, log

    async def __aenter__(self) -> FakeCursor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def execute(self, sql: str, params: tuple[str, ...]) -> None:
        self.log.append((sql, params))

    async def fetchall(self) -> list[tuple[str, int, int]]:
        return list(self.rows)


class FakePool:
    def __init__(self) -> None:
        self.rows: list[tuple[str, int, int]] = []
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


async def test_stored_messages_reads_redis_in_chunks_then_mysql() -> None:
    keys = Keys("rc", 4)
    redis, pool = FakeRedis([entry(i) for i in range(1200, 2300)]), FakePool()
    pool.rows = [(f"m{i}", 2, i) for i in range(1000, 1250)]  # 1200..1249 in both stores
    stored = await stored_messages(redis, pool, keys, "r")
    assert all(key == keys.msgs("r") and end - start + 1 <= LRANGE_CHUNK for key, start, end in redis.calls)
    assert [s[0] for s in stored[:1100]] == [f"m{i}" for i in range(1200, 2300)]
    assert stored[1100:] == [(f"m{i}", f"2-{i}", "mysql") for i in range(1000, 1250)]
    assert pool.log == [(MYSQL_MESSAGES, ("r",))]
    assert sorted(stored_ids(stored)) == sorted(f"m{i}" for i in range(1000, 2300))


async def test_stored_messages_misses_nothing_while_a_mover_trims_the_head() -> None:
    redis, pool = FakeRedis([entry(i) for i in range(1300)]), FakePool()

    def move_oldest() -> None:  # insert first, then trim: the mover's order
        chunk, redis.items = redis.items[:100], redis.items[100:]
        pool.rows += [(orjson.loads(e)["id"], 2, orjson.loads(e)["ts"]) for e in chunk]

    redis.on_read = move_oldest
    stored = await stored_messages(redis, pool, Keys("rc", 4), "r")
    assert check_storage({"r": [f"m{i}" for i in range(1300)]}, {"r": stored_ids(stored)}).ok


async def test_stored_messages_of_an_empty_room() -> None:
    assert await stored_messages(FakeRedis([]), FakePool(), Keys("rc", 4), "r") == []
