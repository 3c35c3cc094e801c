"""The persister's Redis script against a real Redis: what one batch stores, byte for byte, and
what it skips (a producer retry's copy, a resend under another id, offsets already applied)."""

from __future__ import annotations

import redis.asyncio as aioredis

from shared.cursor import Position
from shared.keys import Keys
from shared.message import Message
from shared.settings import Settings
from shared.store.buffer import RedisBuffer

BODIES = ["plain", 'quotes " and \\ backslash', "new\nline\ttab", "ünïcödé 漢字 🎉", "", "x" * 4000]


def message(keys: Keys, room: str, n: int, offset: int, body: str = "hi", cmid: str | None = None,
            msg_id: str | None = None) -> Message:
    return Message(msg_id or f"ID{n:08d}", room, f"user{n % 3}", body, 1_764_000_000_000 + n, cmid or f"cmid-{n}",
                   Position(keys.partition(room), offset))


async def test_a_batch_is_stored_byte_for_byte_with_its_acks_and_mark(settings: Settings,
                                                                      redis: aioredis.Redis) -> None:
    keys = Keys(settings.redis_prefix, settings.kafka_partitions)
    buffer = RedisBuffer(redis, keys, cap=3, dedupe_ttl_s=60)
    room = "r-bytes"
    p = keys.partition(room)
    batch = [message(keys, room, n, 10 + n, body) for n, body in enumerate(BODIES)]

    applied = await buffer.apply(p, None, batch)

    assert (applied.mark, applied.rewind, applied.lengths) == (10 + len(BODIES) - 1, False, {room: len(BODIES)})
    assert await redis.lrange(keys.msgs(room), 0, -1) == [m.entry() for m in batch]
    for m in batch:
        assert await redis.get(keys.sent(room, m.user, m.client_msg_id)) == m.ack()
    assert await redis.hgetall(keys.meta(room)) == {
        b"first_ts": str(batch[0].ts).encode(), b"last_ts": str(batch[-1].ts).encode(), b"reg": b"1"}
    assert await redis.smembers(keys.over_cap(p)) == {room.encode()}
    assert await redis.get(keys.applied(p)) == str(10 + len(BODIES) - 1).encode()


async def test_a_batch_of_interleaved_rooms_keeps_each_rooms_meta_and_work_lists(
        settings: Settings, redis: aioredis.Redis) -> None:
    # The script writes what is per room (last ts, registration, the cap check) and the seen sets'
    # expiry once per batch: each room must still end with its own values.
    keys = Keys(settings.redis_prefix, settings.kafka_partitions)
    buffer = RedisBuffer(redis, keys, cap=3, dedupe_ttl_s=60)
    p = keys.partition("r-mix-a")
    rooms = [r for r in (f"r-mix-{c}" for c in "abcdefghijklmnop") if keys.partition(r) == p][:3]
    assert len(rooms) == 3, "three rooms of one partition"
    a, b, c = rooms
    order = [a, b, a, c, a, b, a]  # a: 4 messages (past the cap of 3), b: 2, c: 1
    batch = [message(keys, room, n, 100 + n) for n, room in enumerate(order)]

    applied = await buffer.apply(p, None, batch)

    assert applied.lengths == {a: 4, b: 2, c: 1}
    for room in rooms:
        mine = [m for m in batch if m.room == room]
        assert await redis.lrange(keys.msgs(room), 0, -1) == [m.entry() for m in mine]
        assert await redis.hgetall(keys.meta(room)) == {
            b"first_ts": str(mine[0].ts).encode(), b"last_ts": str(mine[-1].ts).encode(), b"reg": b"1"}
    assert await redis.smembers(keys.over_cap(p)) == {a.encode()}
    assert await redis.smembers(keys.new_rooms(p)) == {r.encode() for r in rooms}
    seen = keys.seen(p, batch[0].ts)
    assert await redis.scard(seen) == len(batch)
    assert 0 < await redis.ttl(seen) <= 60

    # A later batch: registered rooms are not listed again, last_ts moves, first_ts stays.
    await redis.delete(keys.new_rooms(p))
    later = message(keys, b, 50, 200)
    await buffer.apply(p, applied.mark, [later])
    assert await redis.smembers(keys.new_rooms(p)) == set()
    assert await redis.hmget(keys.meta(b), ["first_ts", "last_ts"]) == [
        str(batch[1].ts).encode(), str(later.ts).encode()]
    assert await redis.smembers(keys.over_cap(p)) == {a.encode()}


async def test_copies_resends_and_old_offsets_are_skipped(settings: Settings, redis: aioredis.Redis) -> None:
    keys = Keys(settings.redis_prefix, settings.kafka_partitions)
    buffer = RedisBuffer(redis, keys, cap=100, dedupe_ttl_s=60)
    room = "r-skips"
    p = keys.partition(room)
    first = message(keys, room, 1, 5)
    await buffer.apply(p, None, [first])

    applied = await buffer.apply(p, 5, [
        message(keys, room, 1, 4, body="an old offset"),
        message(keys, room, 1, 6),  # a producer retry: the same id again
        message(keys, room, 2, 7, cmid=first.client_msg_id, msg_id="OTHER-ID"),  # another user's cmid
        message(keys, room, 4, 8, cmid=first.client_msg_id, msg_id="RESENT-ID"),  # first's user: a resend
    ])

    stored = await redis.lrange(keys.msgs(room), 0, -1)
    assert [Message.from_entry(e).id for e in stored] == [first.id, "OTHER-ID"]
    assert applied.mark == 8
    assert await redis.get(keys.sent(room, first.user, first.client_msg_id)) == first.ack()

    stale = await buffer.apply(p, 7, [message(keys, room, 9, 9)])  # the stored mark is 8, not 7
    assert stale.rewind and stale.mark == 8
    assert await redis.llen(keys.msgs(room)) == 2


async def test_the_ack_is_recorded_over_a_gateways_claim_but_not_over_a_first_ack(
        settings: Settings, redis: aioredis.Redis) -> None:
    # The gateway's claims (gateway.publisher) are not ack frames: a stored copy's ack replaces a
    # claim in flight and a failed produce's claim, so a resend gets that ack instead of publishing.
    keys = Keys(settings.redis_prefix, settings.kafka_partitions)
    buffer = RedisBuffer(redis, keys, cap=100, dedupe_ttl_s=60)
    room = "r-claims"
    in_flight, failed, acked = (message(keys, room, n, n) for n in (1, 2, 3))
    for m, value in ((in_flight, b"pending|" + in_flight.id.encode() + b"|1"),
                     (failed, b"retry|" + failed.id.encode() + b"|1"), (acked, b'{"type":"ack","id":"EARLIER"}')):
        await redis.set(keys.sent(room, m.user, m.client_msg_id), value)

    await buffer.apply(keys.partition(room), None, [in_flight, failed, acked])

    assert await redis.get(keys.sent(room, in_flight.user, in_flight.client_msg_id)) == in_flight.ack()
    assert await redis.get(keys.sent(room, failed.user, failed.client_msg_id)) == failed.ack()
    assert await redis.get(keys.sent(room, acked.user, acked.client_msg_id)) == b'{"type":"ack","id":"EARLIER"}'
    stored = await redis.lrange(keys.msgs(room), 0, -1)
    assert [Message.from_entry(e).id for e in stored] == [in_flight.id, failed.id], "a resend under another id"
