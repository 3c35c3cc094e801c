"""Issue 3: resume from a cursor, and idempotent sends across nodes. Each resume says which store
served its gap (Redis, MySQL or the log) and holds the gateway's resumed-messages metric to it."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import aiomysql
import pytest
import redis.asyncio as aioredis

from shared.keys import Keys
from shared.settings import Settings
from tests.faults.proxy import TcpProxy
from tests.support import Cluster, Peer, delete_before, eventually, offset, partition_of, token

pytestmark = pytest.mark.timeout(180)


async def send_many(p: Peer, room: str, n: int, tag: str) -> list[dict]:
    start = len(p.acks())
    for i in range(n):
        await p.send({"type": "send", "room": room, "client_msg_id": f"{tag}{i}", "body": f"{tag} {i}"})

    async def acked() -> bool:
        return len(p.acks()) >= start + n

    await eventually(acked, 30, what=f"{n} acks")
    return sorted(p.acks()[start:], key=lambda a: offset(a["cursor"]))


async def applied(redis: aioredis.Redis, settings: Settings, cursor: str) -> None:
    """Until the persister has applied the room's partition up to `cursor`."""
    keys = Keys(settings.redis_prefix, settings.kafka_partitions)
    key = keys.applied(int(cursor.split("-")[0]))

    async def reached() -> bool:
        mark = await redis.get(key)
        return mark is not None and int(mark) >= offset(cursor)

    await eventually(reached, 30, what=f"the applied mark at {cursor}")


async def flushed(redis: aioredis.Redis, settings: Settings, room: str) -> int:
    """Until the persister has moved the room's list down to its cap; its length then."""
    key = Keys(settings.redis_prefix, settings.kafka_partitions).msgs(room)

    async def short() -> bool:
        return int(await redis.llen(key)) <= settings.buffer_cap

    await eventually(short, 30, what=f"{room} flushed to its cap")
    return int(await redis.llen(key))


@pytest.mark.parametrize("missed", [5, 100])  # 100 > cap: most of the gap is already in MySQL
async def test_resume_replays_exactly_the_missed_messages_then_live(
        cluster: Cluster, small_buffer: Settings, redis: aioredis.Redis, missed: int) -> None:
    sender = await Peer.connect(cluster.url(0), token(small_buffer, "alice"))
    b = await Peer.connect(cluster.url(1), token(small_buffer, "bob"))
    await b.join("lobby")
    await send_many(sender, "lobby", 3, "before")
    await b.wait_for(lambda f: f["type"] == "message" and f["body"] == "before 2")
    last = b.messages("lobby")[-1]["cursor"]
    await b.close()

    gap = await send_many(sender, "lobby", missed, "gap")
    await applied(redis, small_buffer, gap[-1]["cursor"])
    in_redis = await flushed(redis, small_buffer, "lobby")  # the newest of the gap; the rest is in MySQL
    before = cluster.resumed(0)
    b2 = await Peer.connect(cluster.url(0), token(small_buffer, "bob"))  # the other node
    joined = await b2.join("lobby", cursor=last)
    assert joined["type"] == "joined" and joined["recovered"] is True
    await send_many(sender, "lobby", 3, "after")
    await b2.wait_for(lambda f: f["type"] == "message" and f["body"] == "after 2")
    await asyncio.sleep(0.2)
    got = b2.messages("lobby")
    assert [m["id"] for m in got[:missed]] == [a["id"] for a in gap], "exactly the missed ones, in order"
    assert [m["body"] for m in got[missed:]] == [f"after {i}" for i in range(3)]
    offsets = [offset(m["cursor"]) for m in got]
    assert offsets == sorted(set(offsets))
    served = Counter(redis=min(missed, in_redis), mysql=missed - min(missed, in_redis))
    assert cluster.resumed(0) - before == served, "the gap came from Redis, and what it no longer held from MySQL"
    assert (missed == 100) == (served["mysql"] > 0)
    for p in (sender, b2):
        await p.close()


async def test_an_empty_rooms_join_cursor_is_clean_and_a_resume_from_it_replays_everything(
        cluster: Cluster, small_buffer: Settings) -> None:
    partition = partition_of(small_buffer, "fresh").partition
    b = await Peer.connect(cluster.url(1), token(small_buffer, "bob"))
    joined = await b.join("fresh")
    assert joined["cursor"] == f"{partition}-start", "nothing was ever sent to this test's topic"
    await b.close()
    sender = await Peer.connect(cluster.url(0), token(small_buffer, "alice"))
    sent = await send_many(sender, "fresh", 3, "m")
    for cursor in (joined["cursor"], f"{partition}--1"):  # (the form servers issued for it before)
        b2 = await Peer.connect(cluster.url(0), token(small_buffer, "bob"))
        again = await b2.join("fresh", cursor=cursor)
        assert again["type"] == "joined" and again["recovered"] is True, again
        await b2.wait_for(lambda f: f["type"] == "message" and f["body"] == "m 2")
        assert [m["id"] for m in b2.messages("fresh")] == [a["id"] for a in sent]
        await b2.close()
    await sender.close()


async def test_resume_with_an_invalid_cursor_is_live_only_and_says_not_recovered(
        cluster: Cluster, small_buffer: Settings) -> None:
    p = await Peer.connect(cluster.url(0), token(small_buffer, "carol"))
    for bad in ("garbage", "99-5"):  # not a cursor; a cursor of another partition
        joined = await p.join("lobby", cursor=bad)
        assert joined["type"] == "joined" and joined["recovered"] is False
    await p.close()


async def test_a_resume_ahead_of_this_gateways_fan_out_gets_no_message_it_had_again(
        cluster: Cluster, small_buffer: Settings) -> None:
    """A client's last gateway had fanned out further than the one it resumes on (it died: the
    gateway fault test saw this): what comes live here up to its cursor, it had. Here its cursor is
    3 records past what this gateway fanned out."""
    sender = await Peer.connect(cluster.url(0), token(small_buffer, "alice"))
    [last] = await send_many(sender, "lobby", 1, "seen")
    part, end = last["cursor"].split("-")
    p = await Peer.connect(cluster.url(1), token(small_buffer, "dave"))
    joined = await p.join("lobby", cursor=f"{part}-{int(end) + 3}")
    assert joined["recovered"] is True
    later = await send_many(sender, "lobby", 5, "later")
    await p.wait_for(lambda f: f["type"] == "message" and f["body"] == "later 4")
    assert [m["id"] for m in p.messages("lobby")] == [a["id"] for a in later[3:]], "only what it had not"
    for peer in (sender, p):
        await peer.close()


async def test_a_resend_to_the_other_node_is_acked_with_the_first_ack_and_stored_once(
        cluster: Cluster, small_buffer: Settings, redis: aioredis.Redis, mysql: aiomysql.Pool) -> None:
    from shared.keys import Keys
    from tools.checker import stored_ids, stored_messages

    a = await Peer.connect(cluster.url(0), token(small_buffer, "dave"))
    b = await Peer.connect(cluster.url(1), token(small_buffer, "dave"))
    watcher = await Peer.connect(cluster.url(1), token(small_buffer, "erin"))
    await watcher.join("lobby")
    frame = {"type": "send", "room": "lobby", "client_msg_id": "same-key", "body": "once"}
    await a.send(frame)
    first = await a.wait_for(lambda f: f["type"] == "ack")
    await b.send(frame)
    second = await b.wait_for(lambda f: f["type"] == "ack")
    assert first == second
    await watcher.wait_for(lambda f: f["type"] == "message")
    await asyncio.sleep(0.5)
    assert len(watcher.messages("lobby")) == 1
    keys = Keys(small_buffer.redis_prefix, small_buffer.kafka_partitions)

    async def stored_once() -> bool:
        return stored_ids(await stored_messages(redis, mysql, keys, "lobby")) == [first["id"]]

    await eventually(stored_once, 10, what="stored exactly once")
    for p in (a, b, watcher):
        await p.close()


async def test_resume_while_the_persister_is_down_reads_the_gap_from_kafka(
        cluster: Cluster, small_buffer: Settings, redis: aioredis.Redis) -> None:
    sender = await Peer.connect(cluster.url(0), token(small_buffer, "alice"))
    b = await Peer.connect(cluster.url(1), token(small_buffer, "bob"))
    await b.join("lobby")
    stored = await send_many(sender, "lobby", 30, "stored")  # past the cap: partly in MySQL already
    await b.wait_for(lambda f: f["type"] == "message" and f["body"] == "stored 29")
    first = b.messages("lobby")[4]  # resume from early on: the gap spans storage and the log
    await b.close()
    assert cluster.persister is not None
    await applied(redis, small_buffer, stored[-1]["cursor"])
    in_redis = await flushed(redis, small_buffer, "lobby")
    cluster.persister.stop()
    gap = await send_many(sender, "lobby", 10, "unpersisted")
    before = cluster.resumed(0)
    b2 = await Peer.connect(cluster.url(0), token(small_buffer, "bob"))
    joined = await b2.join("lobby", cursor=first["cursor"])
    assert joined["type"] == "joined" and joined["recovered"] is True
    await b2.wait_for(lambda f: f["type"] == "message" and f["body"] == "unpersisted 9")
    got = b2.messages("lobby")
    assert [m["body"] for m in got] == [f"stored {i}" for i in range(5, 30)] + [f"unpersisted {i}" for i in range(10)]
    assert [m["id"] for m in got[-10:]] == [a["id"] for a in gap]
    assert cluster.resumed(0) - before == Counter(redis=in_redis, mysql=25 - in_redis, kafka=10), \
        "what the persister had applied came from storage, the rest from the log"
    for p in (sender, b2):
        await p.close()


async def test_a_resume_past_what_retention_deleted_replays_the_rest_and_says_not_recovered(
        cluster: Cluster, small_buffer: Settings) -> None:
    """The persister down for longer than the topic keeps records: what it never applied is gone
    (DeleteRecords moves the log start as retention does). The resume says so, and replays the rest."""
    sender = await Peer.connect(cluster.url(0), token(small_buffer, "alice"))
    cursor = (await sender.join("lobby"))["cursor"]
    assert cluster.persister is not None
    cluster.persister.stop()
    gap = await send_many(sender, "lobby", 10, "unpersisted")
    await delete_before(small_buffer, partition_of(small_buffer, "lobby"), offset(gap[5]["cursor"]))
    b = await Peer.connect(cluster.url(1), token(small_buffer, "bob"))
    before = cluster.resumed(1)
    joined = await b.join("lobby", cursor=cursor)
    assert joined["type"] == "joined" and joined["recovered"] is False
    await b.wait_for(lambda f: f["type"] == "message" and f["body"] == "unpersisted 9")
    assert [m["id"] for m in b.messages("lobby")] == [a["id"] for a in gap[5:]]
    assert cluster.resumed(1) - before == Counter(kafka=5), "what was left came from the log"
    for p in (sender, b):
        await p.close()


async def test_resume_while_redis_is_away_reads_the_missed_range_from_kafka(
        cluster_behind_a_redis_proxy: tuple[Cluster, TcpProxy]) -> None:
    cluster, redis_proxy = cluster_behind_a_redis_proxy
    settings = cluster.settings
    sender = await Peer.connect(cluster.url(0), token(settings, "alice"))
    b = await Peer.connect(cluster.url(1), token(settings, "bob"))
    cursor = (await b.join("lobby"))["cursor"]
    await b.close()
    sent = await send_many(sender, "lobby", 5, "m")
    await redis_proxy.cut()  # the applied mark, the list and the dedupe keys are out of reach
    before = cluster.resumed(0)
    b2 = await Peer.connect(cluster.url(0), token(settings, "bob"))
    joined = await b2.join("lobby", cursor=cursor)
    assert joined["type"] == "joined" and joined["recovered"] is True
    await b2.wait_for(lambda f: f["type"] == "message" and f["body"] == "m 4")
    assert [m["id"] for m in b2.messages("lobby")] == [a["id"] for a in sent]
    assert cluster.resumed(0) - before == Counter(kafka=5), "Redis away: the whole gap came from the log"
    for p in (sender, b2):
        await p.close()


async def test_a_join_sent_again_while_the_first_resumes_is_answered_once_without_a_hole(
        cluster: Cluster, small_buffer: Settings) -> None:
    """A client re-sends a join left unanswered; a resume waits for the persister (stopped here) up
    to RECOVERY_WAIT_S. Two resumes at once each held the room's live frames, so the messages sent
    between them never reached the client."""
    sender = await Peer.connect(cluster.url(0), token(small_buffer, "alice"))
    b = await Peer.connect(cluster.url(1), token(small_buffer, "bob"))
    cursor = (await b.join("lobby"))["cursor"]
    await b.close()
    assert cluster.persister is not None
    cluster.persister.stop()
    missed = await send_many(sender, "lobby", 3, "missed")
    b2 = await Peer.connect(cluster.url(1), token(small_buffer, "bob"))
    await b2.send({"type": "join", "room": "lobby", "cursor": cursor})
    during = await send_many(sender, "lobby", 3, "during")  # live while the resume waits: held for b2
    await b2.send({"type": "join", "room": "lobby", "cursor": cursor})  # the client's re-send
    after = await send_many(sender, "lobby", 3, "after")
    await b2.wait_for(lambda f: f["type"] == "message" and f["body"] == "after 2", timeout=20)
    await asyncio.sleep(small_buffer.recovery_wait_s + 1)  # a second answer would have come by now
    assert [f["type"] for f in b2.frames if f["type"] in ("joined", "error")] == ["joined"]
    assert [m["id"] for m in b2.messages("lobby")] == [a["id"] for a in missed + during + after]
    for p in (sender, b2):
        await p.close()


@pytest.mark.parametrize("persister", ["up", "down"])  # the gap from storage, or from the log
async def test_a_resume_that_missed_more_than_resume_max_messages_replays_nothing_and_says_not_recovered(
        small_buffer: Settings, log_dir: Path, redis: aioredis.Redis, persister: str) -> None:
    settings = small_buffer.model_copy(update={"resume_max_messages": 10})
    cluster = Cluster(settings, log_dir).start(gateways=1, persister=persister == "up")
    try:
        sender = await Peer.connect(cluster.url(0), token(settings, "alice"))
        for missed, recovered in ((10, True), (11, False)):  # at the limit, and one past it
            room = f"max-{missed}"
            cursor = (await sender.join(room))["cursor"]
            gap = await send_many(sender, room, missed, "gap")
            if persister == "up":
                await applied(redis, settings, gap[-1]["cursor"])
            before = cluster.resumed(0)
            b = await Peer.connect(cluster.url(0), token(settings, "bob"))
            joined = await b.join(room, cursor=cursor)
            assert (joined["type"], joined["recovered"]) == ("joined", recovered), joined
            live = await send_many(sender, room, 1, "live")
            await b.wait_for(lambda f, live=live: f["type"] == "message" and f["id"] == live[0]["id"])
            replayed = [m["id"] for m in b.messages(room)[:-1]]
            assert replayed == ([a["id"] for a in gap] if recovered else []), "all of the gap, or none of it"
            assert sum((cluster.resumed(0) - before).values()) == len(replayed)
            await b.close()
        await sender.close()
    finally:
        cluster.stop()
