"""Edits and deletes under faults: two users (the client library, on two gateways) send, edit and
delete their messages while the persister is killed and started again and MySQL is cut off and
back, with a room small enough that edits meet messages in Redis, in MySQL and on their way between
(the chunk mover). Afterwards every path agrees with the oracle, which applies every acknowledged
send, edit and delete in cursor order (a delete final): each message's final state in history
(REST, paged back), in each user's live view, and in a fresh resume from before the first message;
and no deleted body is left in Redis or MySQL."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiomysql
import pytest
import redis.asyncio as aioredis
from roomcast_client import RoomcastClient, RoomcastError, apply

from shared.keys import Keys
from shared.settings import Settings
from tests.faults.proxy import TcpProxy
from tests.support import Cluster, eventually, rest_history, token

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

ROOM = "edit-faults"
MIN_OPS = 40  # per user; traffic goes on until the faults are over


@pytest.fixture
async def cluster(migrated: Settings, log_dir: Path) -> AsyncIterator[tuple[Cluster, TcpProxy]]:
    """A cluster whose services reach MySQL through a proxy the test can cut; cap 20, chunk 10."""
    at = urlsplit(migrated.mysql_dsn)
    proxy = await TcpProxy(at.hostname or "127.0.0.1", at.port or 3306).start()
    auth = at.netloc.rpartition("@")[0]
    dsn = urlunsplit(at._replace(netloc=f"{auth}@127.0.0.1:{proxy.port}"))
    settings = migrated.model_copy(update={"mysql_dsn": dsn, "buffer_cap": 20, "flush_chunk": 10,
                                           "send_burst": 1000, "recovery_wait_s": 2.0})
    c = Cluster(settings, log_dir).start()
    try:
        yield c, proxy
    finally:
        c.stop()
        await proxy.close()


class User:
    """A user's traffic: sends, and edits and deletes of its own acknowledged messages, each op's
    ack kept for the oracle."""

    def __init__(self, name: str, client: RoomcastClient, rng: random.Random) -> None:
        self.name, self.client, self.rng = name, client, rng
        self.frames: list[dict[str, Any]] = []
        self.mine: list[str] = []  # ids of its messages not deleted by it
        self.done: list[tuple[int, str, str, str]] = []  # (offset, kind, message id, body) per ack

    async def run(self, stop: asyncio.Event) -> None:
        i = 0
        while not stop.is_set() or i < MIN_OPS:
            i += 1
            roll = self.rng.random()
            if roll < 0.55 or not self.mine:
                body = f"{self.name} {i} secret"
                ack = await self.client.send(ROOM, body)
                self.mine.append(ack["id"])
                self.done.append((offset(ack["cursor"]), "message", ack["id"], body))
            elif roll < 0.85:
                target, body = self.rng.choice(self.mine), f"{self.name} {i} edited secret"
                ack = await self.client.edit(ROOM, target, body)
                self.done.append((offset(ack["cursor"]), "edit", target, body))
            else:
                target = self.mine.pop(self.rng.randrange(len(self.mine)))
                ack = await self.client.delete(ROOM, target)
                self.done.append((offset(ack["cursor"]), "delete", target, ""))
            await asyncio.sleep(self.rng.random() * 0.05)


def offset(cursor: str) -> int:
    return int(cursor.rpartition("-")[2])


def oracle(users: list[User]) -> dict[str, tuple[Any, ...]]:
    """Every message's final state: the acknowledged ops in cursor order, a delete final."""
    state: dict[str, tuple[Any, ...]] = {}
    for _, kind, mid, body in sorted(op for u in users for op in u.done):
        if kind == "message":
            state[mid] = (body, False)
        elif state[mid] != ("deleted",):
            state[mid] = (body, True) if kind == "edit" else ("deleted",)
    return state


def view(messages: list[dict[str, Any]] | dict[str, dict[str, Any]]) -> dict[str, tuple[Any, ...]]:
    items = messages.values() if isinstance(messages, dict) else messages
    return {m["id"]: ("deleted",) if m.get("deleted") else (m["body"], "edited_ts" in m) for m in items}


async def test_edits_and_deletes_survive_a_killed_persister_and_a_cut_mysql(
        cluster: tuple[Cluster, TcpProxy], redis: aioredis.Redis, mysql: aiomysql.Pool) -> None:
    c, mysql_proxy = cluster
    s = c.settings
    rng = random.Random(24)
    users = []
    for i, name in enumerate(("alice", "bob")):
        frames: list[dict[str, Any]] = []
        client = RoomcastClient([c.url(i), c.url(1 - i)], token(s, name), on_message=frames.append,
                                backoff_base=0.05, backoff_max=0.5)
        await client.start()
        await client.join(ROOM)
        user = User(name, client, random.Random(rng.random()))
        user.frames = frames
        users.append(user)
    start = users[0].client.cursor(ROOM)

    stop = asyncio.Event()

    async def faults() -> None:
        await asyncio.sleep(2)
        assert c.persister is not None
        c.persister.kill()  # mid-traffic: what it applied to Redis but not MySQL waits queued in Redis
        await asyncio.sleep(3)
        await asyncio.to_thread(c.start_persister)
        await asyncio.sleep(2)
        await mysql_proxy.cut()  # flushes and queued edits wait; Redis keeps buffering
        await asyncio.sleep(3)
        await mysql_proxy.restore()
        await asyncio.sleep(1)
        stop.set()

    try:
        await asyncio.wait_for(asyncio.gather(faults(), *(u.run(stop) for u in users)), 240)
    except RoomcastError as e:
        pytest.fail(f"an op was refused for good: {e}")
    expected = oracle(users)
    kinds = [op[1] for u in users for op in u.done]
    print(f"\n{len(kinds)} ops: {kinds.count('message')} sends, {kinds.count('edit')} edits, "
          f"{kinds.count('delete')} deletes")
    assert sum(v == ("deleted",) for v in expected.values()) >= 5
    assert any(v[1:] == (True,) for v in expected.values())
    keys = Keys(s.redis_prefix, s.kafka_partitions)
    last = max(op[0] for u in users for op in u.done)

    async def settled() -> bool:
        mark = await redis.get(keys.applied(keys.partition(ROOM)))
        if mark is None or int(mark) < last or await redis.llen(keys.archived_events(keys.partition(ROOM))):
            return False
        return view(await asyncio.to_thread(rest_history, c.http(0), ROOM, token(s, "x"), 13)) == expected

    await eventually(settled, 60, every=0.5, what="history as the oracle has it")
    async with mysql.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT COUNT(*) FROM messages WHERE kind = 0")
        assert (await cur.fetchone())[0] > 0, "the test must reach MySQL"
    for u in users:
        live: dict[str, dict[str, Any]] = {}
        for f in u.frames:
            apply(live, f)
        assert view(live) == expected, f"{u.name}'s live view"
    frames: list[dict[str, Any]] = []
    async with RoomcastClient(c.url(1), token(s, "carol"), on_message=frames.append) as resumer:
        joined = await resumer.join(ROOM, cursor=start)
        assert joined["recovered"] is True

        async def replayed_to_the_end() -> bool:  # (in order: the last record's frame comes last)
            return any(offset(f["cursor"]) == last for f in frames)

        await eventually(replayed_to_the_end, 15, what="the replay")
    replayed: dict[str, dict[str, Any]] = {}
    for f in frames:
        apply(replayed, f)
    assert view(replayed) == expected, "a resume from before the first message"
    deleted_bodies = {b for u in users for _, kind, mid, b in u.done if expected.get(mid) == ("deleted",)}
    stored = await redis.lrange(keys.msgs(ROOM), 0, -1)
    assert not [e for e in stored if any(b.encode() in e for b in deleted_bodies if b)]
    async with mysql.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT body FROM messages WHERE body <> ''")
        assert not {row[0] for row in await cur.fetchall()} & deleted_bodies, "a deleted body in MySQL"
    for u in users:
        await u.client.close()
