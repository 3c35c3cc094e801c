"""Edits and deletes on a real cluster (Kafka, Redis, MariaDB, two gateways, a persister): every path
a client sees a message by (live, resume from before and after it, a Redis page, a MySQL page, REST
history) agrees on its current state, and a client that applies every frame in order ends with
exactly the server's history."""

from __future__ import annotations

import dataclasses
from typing import Any

import aiomysql
import redis.asyncio as aioredis
from aiokafka import TopicPartition

from persister.service import Persister
from shared.cursor import Position
from shared.kafka import Fetched
from shared.keys import Keys
from shared.message import Message
from shared.settings import Settings
from shared.store.buffer import RedisBuffer
from shared.store.entry import DELETE, EDIT
from shared.store.mover import Mover
from shared.store.rooms import RoomDirectory
from tests.support import Cluster, Peer, delete_keys, eventually, rest_history, token

ROOM = "edits.room"
SECRET = "secret"  # in the bodies that are deleted: never seen again anywhere


class Model:
    """A client that applies every frame it receives, in order (docs/protocol.md)."""

    def __init__(self) -> None:
        self.msgs: dict[str, dict[str, Any]] = {}

    def apply(self, f: dict[str, Any]) -> None:
        kind, mid = f["type"], f.get("id")
        if kind == "message":
            self.msgs[mid] = {k: v for k, v in f.items() if k != "type"}
        elif kind == "edit" and mid in self.msgs and not self.msgs[mid].get("deleted"):
            self.msgs[mid].update(body=f["body"], edited_ts=f["edited_ts"])
        elif kind == "delete" and mid in self.msgs:
            self.msgs[mid] = {"id": mid, "cursor": self.msgs[mid]["cursor"], "deleted": True}

    def apply_all(self, frames: list[dict[str, Any]]) -> Model:
        for f in frames:
            if f.get("room") == ROOM:
                self.apply(f)
        return self


def state(m: dict[str, Any]) -> tuple[Any, ...]:
    return (m["id"], m["cursor"], m.get("body"), m.get("user"), m.get("edited_ts"), m.get("deleted", False))


def view(msgs: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return sorted((state(m) for m in msgs), key=lambda s: int(s[1].split("-")[1]))


async def ws_history(peer: Peer) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    before = None
    while True:
        n = len(peer.frames)
        frame: dict[str, Any] = {"type": "history", "room": ROOM, "limit": 11}
        if before:
            frame["before"] = before
        await peer.send(frame)
        page = await peer.wait_for(lambda f: f["type"] == "history", start=n)
        out = page["messages"] + out
        if page["next"] is None:
            return out
        before = page["next"]


async def write(peer: Peer, frame: dict[str, Any]) -> dict[str, Any]:
    """Send a send/edit/delete; its ack or error."""
    n = len(peer.frames)
    await peer.send(frame)
    return await peer.wait_for(lambda f: f["type"] in ("ack", "error") and f.get("client_msg_id", f.get("ref"))
                               == frame["client_msg_id"], start=n)


async def resumed(cluster: Cluster, tok: str, cursor: str) -> list[dict[str, Any]]:
    """The frames a client resuming from `cursor` gets, up to the first after the replay."""
    peer = await Peer.connect(cluster.url(0), tok)
    try:
        joined = await peer.join(ROOM, cursor)
        assert joined["type"] == "joined" and joined["recovered"] is True, joined
        await peer.send({"type": "ping"})
        await peer.wait_for(lambda f: f["type"] == "pong")
        return [f for f in peer.frames if f["type"] in ("message", "edit", "delete")]
    finally:
        await peer.close()


async def test_edits_and_deletes_agree_on_every_path(cluster: Cluster, redis: aioredis.Redis,
                                                     mysql: aiomysql.Pool) -> None:
    s: Settings = cluster.settings  # cap 20, chunk 10: the first messages are archived to MySQL
    alice_tok, bob_tok = token(s, "alice"), token(s, "bob")
    alice = await Peer.connect(cluster.url(0), alice_tok)
    bob = await Peer.connect(cluster.url(1), bob_tok)
    carol = await Peer.connect(cluster.url(1), token(s, "carol", mod=["edits.*"]))
    start = (await bob.join(ROOM))["cursor"]
    await alice.join(ROOM)
    acks = []
    for i in range(40):
        body = f"{SECRET} {i}" if i in (2, 3, 6, 36) else f"hello {i}"
        acks.append(await write(alice, {"type": "send", "room": ROOM, "client_msg_id": f"m{i}", "body": body}))
    ids = [a["id"] for a in acks]
    mid = acks[30]["cursor"]  # resume from here: after some originals, before every edit

    async def archived() -> bool:
        async with mysql.acquire() as conn, conn.cursor() as cur:
            await cur.execute("SELECT COUNT(*) FROM messages WHERE id IN (%s, %s, %s)", (ids[1], ids[2], ids[3]))
            return bool((await cur.fetchone())[0] == 3)

    await eventually(archived, 20, what="the first messages archived to MySQL")

    def edit(i: int, k: str, body: str) -> dict[str, Any]:
        return {"type": "edit", "room": ROOM, "id": ids[i], "client_msg_id": k, "body": body}

    def delete(i: int, k: str) -> dict[str, Any]:
        return {"type": "delete", "room": ROOM, "id": ids[i], "client_msg_id": k}

    first = await write(alice, edit(1, "e1", "fixed 1"))  # in MySQL
    assert first["type"] == "ack" and first["id"] == ids[1] and first["room"] == ROOM, first
    assert (await write(alice, edit(1, "e1", "fixed 1"))) == first, "a resent edit gets the first ack"
    assert (await write(alice, edit(35, "e35", "fixed 35")))["type"] == "ack"  # in Redis
    assert (await write(alice, edit(3, "e3", f"{SECRET} edited 3")))["type"] == "ack"
    for i, k in ((2, "d2"), (36, "d36"), (3, "d3")):
        assert (await write(alice, delete(i, k)))["type"] == "ack"
    refused = await write(bob, edit(5, "b5", "not yours"))
    assert (refused["type"], refused["code"], refused["ref"]) == ("error", "forbidden", "b5")
    assert (await write(bob, delete(5, "bd5")))["code"] == "forbidden"
    assert (await write(carol, delete(6, "cd6")))["type"] == "ack", "a moderator of the room deletes"

    async def stored_deleted(i: int) -> bool:
        return bool([m for m in await ws_history(bob) if m["id"] == ids[i] and m.get("deleted")])

    await eventually(lambda: stored_deleted(6), 20, what="the delete stored")
    assert (await write(alice, edit(6, "e6", "too late")))["code"] == "not_found"
    assert (await write(alice, {**delete(5, "nf"), "id": "not an id"}))["code"] == "not_found"
    assert (await write(alice, {**delete(5, "nf2"), "id": "01KBJ2Z3Q4R5S6T7V8W9X0Y1Z2"}))["code"] == "not_found"
    too_large = await write(alice, edit(7, "big", "x" * (s.max_body_chars + 1)))
    assert too_large["code"] == "too_large"

    live = await bob.wait_for(lambda f: f["type"] == "delete" and f["id"] == ids[6])
    events = [f for f in bob.frames if f["type"] in ("edit", "delete")]
    assert [(f["type"], f["id"]) for f in events] == [
        ("edit", ids[1]), ("edit", ids[35]), ("edit", ids[3]), ("delete", ids[2]), ("delete", ids[36]),
        ("delete", ids[3]), ("delete", ids[6])], "each once, in order, the resent edit not again"
    assert live["user"] == "carol" and int(live["cursor"].split("-")[1]) > int(acks[-1]["cursor"].split("-")[1])

    history = await ws_history(bob)
    assert view(history) == view(rest_history(cluster.http(1), ROOM, bob_tok, 7)), "WebSocket and REST history agree"
    by_id = {m["id"]: m for m in history}
    assert by_id[ids[1]]["body"] == "fixed 1" and by_id[ids[1]]["edited_ts"] == first["ts"]
    assert by_id[ids[35]]["body"] == "fixed 35"
    for i in (2, 3, 6, 36):
        assert set(by_id[ids[i]]) <= {"id", "cursor", "deleted", "room", "ts"} and by_id[ids[i]]["deleted"] is True
    assert len(history) == 40, "edits and deletes are not messages"
    n = len(bob.frames)
    await bob.send({"type": "history", "room": ROOM, "limit": 7})  # the newest 7 records are events
    newest = await bob.wait_for(lambda f: f["type"] == "history", start=n)
    assert [m["id"] for m in newest["messages"]] == ids[33:], "a page filled from older records"

    expected = view(history)
    assert view(list(Model().apply_all(bob.frames).msgs.values())) == expected, "live"
    assert view(list(Model().apply_all(await resumed(cluster, bob_tok, start)).msgs.values())) == expected
    upto = next(i for i, f in enumerate(bob.frames) if f.get("cursor") == mid)
    model = Model().apply_all(bob.frames[:upto + 1]).apply_all(await resumed(cluster, bob_tok, mid))
    assert view(list(model.msgs.values())) == expected, "resume from after the originals, before the edits"

    # unread counts: messages of others after the mark, not edits, deletes or tombstones
    n = len(bob.frames)
    await bob.send({"type": "read", "room": ROOM, "cursor": mid})
    await bob.wait_for(lambda f: f["type"] == "read" and f["user"] == "bob", start=n)
    await bob.send({"type": "unread"})
    counts = await bob.wait_for(lambda f: f["type"] == "unread", start=n)
    assert counts["rooms"] == [{"room": ROOM, "count": 8, "more": False, "read_cursor": mid}], "31-39 but 36"
    n = len(carol.frames)  # carol's mark is older than the list: most of her count comes from MySQL
    await carol.send({"type": "read", "room": ROOM, "cursor": acks[0]["cursor"]})
    await carol.wait_for(lambda f: f["type"] == "read" and f["user"] == "carol", start=n)
    await carol.send({"type": "unread"})
    counts = await carol.wait_for(lambda f: f["type"] == "unread", start=n)
    assert counts["rooms"][0]["count"] == 39 - 4, "1-39 but the four deleted"

    await assert_no_secret(s, redis, mysql)
    # Redis lost everything: the persister replays the log from its start; no deleted body comes back
    await delete_keys(redis, s.redis_prefix)

    async def replayed() -> bool:
        keys = Keys(s.redis_prefix, s.kafka_partitions)
        mark = await redis.get(keys.applied(keys.partition(ROOM)))
        return mark is not None and int(mark) >= int(live["cursor"].split("-")[1])

    await eventually(replayed, 30, what="the log replayed into Redis")
    assert view(await ws_history(bob)) == expected
    assert view(list(Model().apply_all(await resumed(cluster, bob_tok, start)).msgs.values())) == expected
    await assert_no_secret(s, redis, mysql)
    for p in (alice, bob, carol):
        await p.close()


async def assert_no_secret(s: Settings, redis: aioredis.Redis, mysql: aiomysql.Pool) -> None:
    keys = Keys(s.redis_prefix, s.kafka_partitions)
    stored = await redis.lrange(keys.msgs(ROOM), 0, -1)
    assert stored and not [e for e in stored if SECRET.encode() in e], "a deleted body in Redis"
    async with mysql.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT id, kind, user_id, deleted FROM messages WHERE body LIKE %s", (f"%{SECRET}%",))
        assert await cur.fetchall() == (), "a deleted body in MySQL"
        await cur.execute("SELECT COUNT(*) FROM messages WHERE deleted = 1 AND kind = 0 AND user_id = ''")
        assert (await cur.fetchone())[0] >= 2, "the archived deleted messages are tombstones"




async def test_an_edit_racing_the_chunk_move_is_archived_as_it_is_now(migrated: Settings, redis: aioredis.Redis,
                                                                      mysql: aiomysql.Pool) -> None:
    """A mover reads a chunk, an edit changes an entry of it, the mover archives what it read: the
    trim refuses, the next move archives the edited entry; a stale copy archived again (a second
    mover) never takes an edit or a delete back."""
    keys = Keys(migrated.redis_prefix, migrated.kafka_partitions)
    room, ts = "race.room", 1_764_000_000_000
    p = keys.partition(room)
    buffer = RedisBuffer(redis, keys, 1000, 60)
    msgs = [Message(f"01RACE{i:020d}", room, "alice", f"m{i}", ts + i, f"c{i}", Position(p, i)) for i in range(6)]
    await buffer.apply(p, None, msgs)
    mover = Mover(redis, mysql, keys, RoomDirectory(mysql))
    chunk = await buffer.oldest(room, 4)
    edit = Message("01RACEEDIT0000000000000000", room, "alice", "fixed", ts + 10, "e1", Position(p, 6),
                   EDIT, msgs[2].id, 2)
    assert (await buffer.apply(p, 5, [edit])).archived_events == 0, "the message is in the list"
    await mover.insert(room, [Message.from_entry(raw) for raw in chunk.entries])
    assert await buffer.trim_if_head(room, chunk.entries, chunk.edits) == -1, "the chunk changed since it was read"
    assert (await mover.move_oldest(room, 4)).moved == 4
    now = await mover.archive.find(room, msgs[2].id)
    assert now is not None and (now.body, now.edited_ts, now.rev) == ("fixed", ts + 10, 6)

    delete = Message("01RACEDELETE00000000000000", room, "bob", "", ts + 11, "d1", Position(p, 7),
                     DELETE, msgs[2].id, 2)
    applied = await buffer.apply(p, 6, [delete])
    assert applied.archived_events == 1, "archived already: queued for MySQL"
    queued = await buffer.archived_events(p, 10)
    assert await mover.archive.apply_events([Message.from_entry(raw) for raw in queued]) == []
    await buffer.drop_archived_events(p, queued)
    assert await buffer.archived_events(p, 10) == []
    await mover.insert(room, [Message.from_entry(raw) for raw in chunk.entries])  # a stale copy, archived again
    gone = await mover.archive.find(room, msgs[2].id)
    assert gone is not None and (gone.deleted, gone.body, gone.user) == (True, "", "")
    late = Message("01RACELATEEDIT000000000000", room, "alice", f"{SECRET} late", ts + 12, "e2", Position(p, 8),
                   EDIT, msgs[2].id, 2)
    await buffer.apply(p, 7, [late])  # an edit that lost the race with the delete
    blanked = await mover.archive.apply_events([Message.from_entry(raw) for raw in await buffer.archived_events(p, 10)])
    assert [e.id for e in blanked] == [late.id]
    await buffer.blank_edit(late)
    assert not [e for e in await redis.lrange(keys.msgs(room), 0, -1) if SECRET.encode() in e]


class Replaying:  # the unit's edge: the consumer a replay reads, as far as the persister asks it
    def highwater(self, tp: TopicPartition) -> int:
        return 1000


async def test_a_replay_into_an_empty_redis_stores_archived_messages_as_they_are_now(
        migrated: Settings, redis: aioredis.Redis, mysql: aiomysql.Pool) -> None:
    """Redis lost everything and the persister reads the log again: a message archived and deleted
    (or edited) since is stored as it is now, never with the body it was sent with; an older edit
    read again after it changes nothing."""
    s = migrated.model_copy(update={"buffer_cap": 1000})
    keys = Keys(s.redis_prefix, s.kafka_partitions)
    room, ts = "replay.room", 1_764_000_000_000
    p = keys.partition(room)
    tp = TopicPartition(s.kafka_topic, p)
    sent = [Message(f"01REPLAY{i:018d}", room, "alice", f"{SECRET} {i}", ts + i, f"c{i}", Position(p, i))
            for i in range(3)]
    rooms = RoomDirectory(mysql)
    mover = Mover(redis, mysql, keys, rooms)
    now = [dataclasses.replace(sent[0], user="", body="", deleted=True),
           dataclasses.replace(sent[1], body="fixed", edited_ts=ts + 9, rev=9), sent[2]]
    await mover.insert(room, now)
    persister = Persister(s, redis, mover, rooms, Replaying())  # type: ignore[arg-type]
    persister.partitions.take(p, None)
    persister.replaying.add(p)
    older_edit = Message("01REPLAYEDIT00000000000005", room, "alice", f"{SECRET} old edit", ts + 5, "e5",
                         Position(p, 5), EDIT, sent[1].id, 1)
    await persister.apply_all([Fetched(tp, [*sent, older_edit], 0, 6)])
    stored = [Message.from_entry(raw) for raw in await redis.lrange(keys.msgs(room), 0, -1)]
    assert [(m.id, m.deleted, m.body) for m in stored[:3]] == [
        (sent[0].id, True, ""), (sent[1].id, False, "fixed"), (sent[2].id, False, f"{SECRET} 2")]
    assert stored[1].rev == 9, "the older edit read again after it changed nothing"
