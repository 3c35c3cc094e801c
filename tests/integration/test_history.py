"""History pages against real Redis and MariaDB: look-aside paging, single-flight, REST."""

from __future__ import annotations

import asyncio
import json
import random
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiomysql
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from gateway.history import HistoryReader, history_frame
from shared.auth import mint_token
from shared.errors import BadRequest
from shared.errors import StoreUnavailable as Unavailable
from shared.keys import Keys
from shared.message import Message
from shared.settings import Settings
from shared.store.buffer import READ_RUN
from shared.store.entry import parse as parse_entry
from shared.store.paging import Page
from tests.support_seed import DAY_MS, Seeder
from tools import localstack
from tools.services import start_gateway

ROOM = "hist.room-1"
NOW = 1_800_000_000_000


def mysql_queries() -> float:
    return REGISTRY.get_sample_value("roomcast_gateway_history_mysql_queries_total") or 0.0


async def seed_room(settings: Settings, redis: aioredis.Redis, mysql: aiomysql.Pool, total: int = 1000,
                    mysql_upto: int = 850, redis_from: int = 840) -> list[Message]:
    """`total` messages; MySQL holds [0, mysql_upto), Redis [redis_from, total): both hold the overlap."""
    seeder = Seeder(settings, redis, mysql)
    msgs = seeder.messages(ROOM, [NOW - DAY_MS + i for i in range(total)], gap=3)
    await seeder.register([ROOM])
    await seeder.to_mysql(ROOM, msgs[:mysql_upto])
    await seeder.to_redis({ROOM: msgs[redis_from:]})
    return msgs


async def page_back(reader: HistoryReader, limit: int | None) -> list[Page]:
    pages, before = [], None
    for _ in range(2000):
        page = await reader.page(ROOM, before, limit)
        pages.append(page)
        if page.next is None:
            return pages
        before = page.next
    raise AssertionError("paging did not end")


def ids(pages: list[Page]) -> list[str]:
    return [e.id for p in reversed(pages) for e in p.entries]


@pytest.fixture
def reader(settings: Settings, redis: aioredis.Redis, mysql: aiomysql.Pool) -> HistoryReader:
    return HistoryReader(settings, Keys(settings.redis_prefix, settings.kafka_partitions), redis, mysql)


async def test_paging_back_returns_all_1000_once_in_order(settings: Settings, redis: aioredis.Redis,
                                                          mysql: aiomysql.Pool, reader: HistoryReader) -> None:
    msgs = await seed_room(settings, redis, mysql)
    before = mysql_queries()
    first = await reader.page(ROOM, None, None)  # default limit 50: the list holds 160
    assert [e.id for e in first.entries] == [m.id for m in msgs[-50:]]
    assert first.next == msgs[-50].cursor
    assert mysql_queries() == before, "the first page must come from Redis alone"

    pages = await page_back(reader, 50)
    assert ids(pages) == [m.id for m in msgs]  # every message once, in order (the overlap too)
    assert all(len(p.entries) == 50 for p in pages)
    assert pages[-1].next is None
    # Pages 1-3 (offsets of messages 850-999) are in Redis only; page 4 straddles: 840-849 from
    # Redis, 800-839 from MySQL; the other 16 pages come from MySQL.
    straddle = pages[3]
    assert straddle.entries[0].id == msgs[800].id and straddle.entries[-1].id == msgs[849].id
    assert mysql_queries() - before == 17

    for limit in (1, 7, 33, 200, 10_000):  # 10,000 is capped at history_limit_max = 200
        pages = await page_back(reader, limit)
        assert ids(pages) == [m.id for m in msgs], limit
        assert max(len(p.entries) for p in pages) == min(limit, 200)


async def test_frames_match_pages_and_bad_cursors_fail(settings: Settings, redis: aioredis.Redis,
                                                       mysql: aiomysql.Pool, reader: HistoryReader) -> None:
    msgs = await seed_room(settings, redis, mysql, total=120, mysql_upto=60, redis_from=60)
    keys = Keys(settings.redis_prefix, settings.kafka_partitions)
    node = SimpleNamespace(history=HistoryReader(settings, keys, redis, mysql))
    failures: list[tuple[str, str]] = []

    def fail(code: str, reason: str, *args: object, **kw: object) -> None:
        failures.append((code, reason))

    frame = json.loads(await history_frame(node, ROOM, msgs[100].cursor, 30, fail))
    assert frame["type"] == "history" and frame["room"] == ROOM
    assert frame["messages"] == [json.loads(m.entry()) for m in msgs[70:100]]  # straddles 60
    assert frame["next"] == msgs[70].cursor
    page = await reader.page(ROOM, msgs[100].cursor, 30)
    assert json.loads(page.body(ROOM, frame=True)) == frame

    other = (keys.partition(ROOM) + 1) % settings.kafka_partitions
    for bad in ("nope", "1-x", f"{other}-5", "-3"):
        assert await history_frame(node, ROOM, bad, 10, fail) == ""
    assert [c for c, _ in failures] == ["bad_cursor"] * 4
    empty = json.loads(await history_frame(node, ROOM, msgs[0].cursor, 10, fail))
    assert empty["messages"] == [] and empty["next"] is None
    unknown = json.loads(await history_frame(node, "no.such.room", None, None, fail))
    assert unknown["messages"] == [] and unknown["next"] is None


async def test_concurrent_identical_misses_share_one_query(settings: Settings, redis: aioredis.Redis,
                                                           mysql: aiomysql.Pool, reader: HistoryReader) -> None:
    msgs = await seed_room(settings, redis, mysql, total=300, mysql_upto=200, redis_from=200)
    cursor = msgs[150].cursor  # a page wholly in MySQL
    locker = await aiomysql.connect(**_connect_kwargs(settings))
    try:
        async with locker.cursor() as cur:
            await cur.execute("LOCK TABLES messages WRITE")  # holds the first query until we unlock
            before = mysql_queries()
            tasks = [asyncio.create_task(reader.page(ROOM, cursor, 20)) for _ in range(25)]
            for _ in range(100):
                await asyncio.sleep(0.01)
                if len(reader.flights) == 1 and all(not t.done() for t in tasks):
                    break
            await asyncio.sleep(0.2)  # every caller is waiting on the one flight
            await cur.execute("UNLOCK TABLES")
        pages = await asyncio.gather(*tasks)
    finally:
        locker.close()
    assert mysql_queries() - before == 1
    assert all([e.id for e in p.entries] == [m.id for m in msgs[130:150]] for p in pages)


async def test_mysql_down_serves_what_redis_holds_and_fails_unavailable_beyond(
        settings: Settings, redis: aioredis.Redis, mysql: aiomysql.Pool) -> None:
    msgs = await seed_room(settings, redis, mysql, total=200, mysql_upto=100, redis_from=100)
    dead = await aiomysql.create_pool(minsize=0, maxsize=1, host="127.0.0.1", port=localstack.free_port(),
                                      user="root", password="", db="x", connect_timeout=1)
    try:
        reader = HistoryReader(settings, Keys(settings.redis_prefix, settings.kafka_partitions), redis, dead)
        page = await reader.page(ROOM, None, 50)
        assert [e.id for e in page.entries] == [m.id for m in msgs[150:]]
        short = await reader.page(ROOM, msgs[120].cursor, 50)  # Redis holds 20 of it: served short
        assert [e.id for e in short.entries] == [m.id for m in msgs[100:120]]
        assert short.next == msgs[100].cursor, "the client can page on once MySQL is back"
        with pytest.raises(Unavailable) as e:
            await reader.page(ROOM, short.next, 50)
        assert e.value.code == "unavailable" and e.value.status == 503
        with pytest.raises(BadRequest):
            await reader.page("bad room", None, 5)
    finally:
        dead.close()
        await dead.wait_closed()


async def test_read_script_finds_any_bound_in_a_long_list(settings: Settings, redis: aioredis.Redis,
                                                          mysql: aiomysql.Pool) -> None:
    """The gallop + bisect over a list far past the cap returns exactly the w entries below a bound."""
    seeder = Seeder(settings, redis, mysql)
    rng = random.Random(4)
    msgs = seeder.messages(ROOM, range(3000), gap=rng.randint(1, 4))
    await seeder.to_redis({ROOM: msgs})
    offsets = [m.position.offset for m in msgs if m.position is not None]
    script = redis.register_script(READ_RUN)
    key = seeder.keys.msgs(ROOM)
    bounds = [None, 0, offsets[0], offsets[0] + 1, offsets[-1], offsets[-1] + 1, 10**12,
              *rng.sample(range(offsets[-1] + 2), 150)]
    for bound in bounds:
        for w in (1, 2, 51, 201):
            res = await script(keys=[key], args=["" if bound is None else bound, w])
            hi = len(offsets) if bound is None else sum(1 for o in offsets if o < bound)
            start = max(hi - w, 0)
            assert [parse_entry(r).offset for r in res[1:]] == offsets[start:hi], (bound, w)
            assert res[0] == (1 if start == 0 else 0)


def _connect_kwargs(settings: Settings) -> dict[str, object]:
    from shared.mysql import MysqlTarget

    return MysqlTarget.from_dsn(settings.mysql_dsn).connect_kwargs()


def _get(url: str, token: str | None = None) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


async def test_rest_serves_the_same_pages(settings: Settings, redis: aioredis.Redis, mysql: aiomysql.Pool,
                                          reader: HistoryReader, log_dir: Path) -> None:
    msgs = await seed_room(settings, redis, mysql, total=260, mysql_upto=150, redis_from=140)
    port = localstack.free_port()
    proc = await asyncio.to_thread(start_gateway, settings, port, log_dir, f"gateway-history-{port}")
    try:
        base = f"http://127.0.0.1:{port}/rooms"
        token = mint_token(settings, "alice")
        got, before = [], ""
        while True:
            status, body = await asyncio.to_thread(_get, f"{base}/{ROOM}/messages?limit=40&before={before}", token)
            assert status == 200, body
            page = await reader.page(ROOM, before or None, 40)
            assert body == json.loads(page.body(ROOM, frame=False))
            got += [m["id"] for m in body["messages"]]
            if body["next"] is None:
                break
            before = str(body["next"])
        assert sorted(got) == sorted(m.id for m in msgs) and len(got) == len(msgs)

        status, body = await asyncio.to_thread(_get, f"{base}/{ROOM}/messages?token={token}")
        assert status == 200 and len(body["messages"]) == 50
        cases = [
            (f"{base}/{ROOM}/messages", None, 401),
            (f"{base}/{ROOM}/messages", "not-a-jwt", 401),
            (f"{base}/{ROOM}/messages?token=garbage", None, 401),
            (f"{base}/{ROOM}/messages", mint_token(settings, "bob", rooms=["other.*"]), 403),
            (f"{base}/bad%20room!/messages", token, 400),
            (f"{base}/{ROOM}/messages?before=zz", token, 400),
            (f"{base}/{ROOM}/messages?before=9-1", token, 400),
            (f"{base}/{ROOM}/messages?limit=0", token, 400),
            (f"{base}/{ROOM}/messages?limit=abc", token, 400),
            (f"{base}/{ROOM}/messages?limit=-5", token, 400),
        ]
        for url, tok, want in cases:
            status, body = await asyncio.to_thread(_get, url, tok)
            assert status == want, (url, status, body)
            assert isinstance(body.get("error"), str)
        status, body = await asyncio.to_thread(_get, f"{base}/{ROOM}/messages?limit=5000", token)
        assert status == 200 and len(body["messages"]) == 200
    finally:
        await asyncio.to_thread(proc.stop)
