"""Issue 2, end to end: two gateway processes, the persister, Kafka, Redis and MariaDB."""

from __future__ import annotations

import asyncio
import random

import aiomysql
import pytest
import redis.asyncio as aioredis
from pydantic import SecretStr

from shared.keys import Keys
from shared.settings import Settings
from tests.support import Cluster, Peer, eventually, offset, token
from tools.services import scrape

pytestmark = pytest.mark.timeout(180)


async def stored(redis: aioredis.Redis, mysql: aiomysql.Pool, settings: Settings, room: str
                 ) -> tuple[list[str], list[str]]:
    """(ids in the room's Redis list, ids in MySQL), each in position order."""
    import orjson

    keys = Keys(settings.redis_prefix, settings.kafka_partitions)
    in_redis: list[str] = []
    start = 0
    while True:
        chunk = await redis.lrange(keys.msgs(room), start, start + 499)
        in_redis += [orjson.loads(e)["id"] for e in chunk]
        if len(chunk) < 500:
            break
        start += 500
    async with mysql.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT m.id FROM messages m JOIN rooms r ON r.id = m.room_id WHERE r.name = %s "
                          "ORDER BY m.kafka_offset", (room,))
        in_mysql = [row[0] for row in await cur.fetchall()]
    return in_redis, in_mysql


async def test_a_send_on_one_node_reaches_both_nodes_in_order_once(cluster: Cluster, small_buffer: Settings) -> None:
    tok = token(small_buffer, "alice")
    a, b, other = (await Peer.connect(cluster.url(0), tok), await Peer.connect(cluster.url(1), tok),
                   await Peer.connect(cluster.url(1), tok))
    for p in (a, b):
        assert (await p.join("lobby"))["type"] == "joined"
    assert (await other.join("elsewhere"))["type"] == "joined"
    for i in range(20):
        await a.send({"type": "send", "room": "lobby", "client_msg_id": f"m{i}", "body": f"hello {i}"})
    for p in (a, b):
        await p.wait_for(lambda f: f["type"] == "message" and f["body"] == "hello 19")
    await a.wait_for(lambda f: f["type"] == "ack" and f["client_msg_id"] == "m19")
    await asyncio.sleep(0.3)  # room for a duplicate or a stray message to show up
    for p in (a, b):
        assert [m["body"] for m in p.messages("lobby")] == [f"hello {i}" for i in range(20)]
    assert other.messages() == []
    acks = {f["client_msg_id"]: f for f in a.acks()}
    assert sorted(acks) == sorted(f"m{i}" for i in range(20))
    assert [acks[f"m{i}"]["id"] for i in range(20)] == [m["id"] for m in b.messages("lobby")]
    for p in (a, b, other):
        await p.close()


async def test_a_thousand_messages_over_ten_rooms_are_delivered_acked_and_stored_exactly_once(
    cluster: Cluster, small_buffer: Settings, redis: aioredis.Redis, mysql: aiomysql.Pool
) -> None:
    rooms = [f"room-{i}" for i in range(10)]
    subs = {}
    for i, room in enumerate(rooms):
        for node in (0, 1):
            p = await Peer.connect(cluster.url(node), token(small_buffer, f"sub-{i}-{node}"))
            assert (await p.join(room))["type"] == "joined"
            subs[(room, node)] = p
    senders = [await Peer.connect(cluster.url(n), token(small_buffer, f"sender-{n}")) for n in (0, 1)]
    rng = random.Random(7)
    for batch in range(10):  # at most 100 sends in flight, as a polite client would
        for k in range(batch * 100, batch * 100 + 100):
            room = rooms[k % 10]
            await senders[rng.randrange(2)].send(
                {"type": "send", "room": room, "client_msg_id": f"k{k}", "body": f"{room}:{k}"})

        async def acked_so_far(n: int = batch * 100 + 100) -> bool:
            return sum(len(s.acks()) for s in senders) == n

        await eventually(acked_so_far, 30, what="acks")
    assert not [f for s in senders for f in s.frames if f["type"] == "error"]
    acked = {f["id"]: f for s in senders for f in s.acks()}
    assert len(acked) == 1000
    by_room: dict[str, set[str]] = {r: set() for r in rooms}
    for f in acked.values():
        by_room[f["room"]].add(f["id"])

    async def all_delivered() -> bool:
        return all(len(p.messages(room)) >= 100 for (room, _), p in subs.items())

    await eventually(all_delivered, 60, what="every subscriber got 100 messages")
    await asyncio.sleep(0.3)
    for (room, _), p in subs.items():
        got = p.messages(room)
        ids = [m["id"] for m in got]
        assert len(ids) == len(set(ids)) == 100, "each message exactly once"
        assert set(ids) == by_room[room]
        offsets = [offset(m["cursor"]) for m in got]
        assert offsets == sorted(offsets), "in cursor order"
        assert len(p.frames) == 101  # joined + 100 messages: nothing from other rooms

    # After the persister caught up: Redis holds the newest (<= cap), MySQL the rest, union = acked.
    async def persisted() -> bool:
        total = 0
        for room in rooms:
            r, m = await stored(redis, mysql, small_buffer, room)
            total += len(set(r) | set(m))
        return total == 1000

    await eventually(persisted, 60, what="persister caught up")
    for room in rooms:
        in_redis, in_mysql = await stored(redis, mysql, small_buffer, room)
        assert len(in_redis) == len(set(in_redis)) and len(in_mysql) == len(set(in_mysql))
        assert set(in_redis) | set(in_mysql) == by_room[room]
        assert len(in_redis) <= small_buffer.buffer_cap
        cursors = sorted((f for f in acked.values() if f["room"] == room), key=lambda f: offset(f["cursor"]))
        newest = [f["id"] for f in cursors[-len(in_redis):]]
        assert in_redis == newest, "Redis keeps exactly the newest messages, in order"
    m = scrape(f"http://127.0.0.1:{cluster.persister_metrics}/metrics")
    statements = m["roomcast_persister_mysql_insert_statements"]
    rows = m["roomcast_persister_mysql_rows_inserted"]
    assert rows >= 1000 - 10 * small_buffer.buffer_cap
    assert statements * small_buffer.flush_chunk == rows, "every insert carried one whole chunk"
    for p in [*subs.values(), *senders]:
        await p.close()


async def test_no_or_bad_token_is_closed_1008(cluster: Cluster, small_buffer: Settings) -> None:
    import websockets

    for query in ("v=1", "v=1&token=garbage", "v=1&token=" + token(small_buffer.model_copy(
            update={"jwt_secret": SecretStr("another-secret-of-sufficient-length-1234")}), "mallory")):
        async with websockets.connect(f"{cluster.url(0)}/ws?{query}") as ws:
            with pytest.raises(websockets.ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 1008


async def test_bad_frames_get_error_frames_and_the_connection_stays_usable(
        cluster: Cluster, small_buffer: Settings) -> None:
    p = await Peer.connect(cluster.url(0), token(small_buffer, "bob"))
    cases = [
        ("not json at all", "bad_frame"),
        ("[1, 2, 3]", "bad_frame"),
        ('{"type": "dance"}', "unknown_type"),
        ('{"no_type": 1}', "unknown_type"),
        ('{"type": "join"}', "bad_frame"),
        ('{"type": "send", "room": "r", "body": "x"}', "bad_frame"),
        ('{"type": "send", "room": 5, "client_msg_id": "a", "body": "x"}', "bad_frame"),
        ('{"type": "join", "room": "no spaces allowed"}', "bad_frame"),
    ]
    for raw, code in cases:
        n = len(p.frames)
        await p.ws.send(raw)
        err = await p.wait_for(lambda f: f["type"] == "error", start=n)
        assert err["code"] == code, raw
        assert err["reason"]
    n = len(p.frames)
    await p.send({"type": "ping"})
    assert (await p.wait_for(lambda f: True, start=n)) == {"type": "pong"}
    await p.send({"type": "send", "room": "ok-room", "client_msg_id": "x1", "body": "still works"})
    ack = await p.wait_for(lambda f: f["type"] == "ack")
    assert ack["client_msg_id"] == "x1" and ack["cursor"]
    await p.close()
