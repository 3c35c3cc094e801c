"""The store against a real Redis: the Lua side of the entry format agrees with the Python side,
and a resume range read (READ_RUN with a lower bound) returns exactly the entries in range."""

from __future__ import annotations

import random

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.cursor import Position
from shared.keys import Keys
from shared.message import Message
from shared.settings import Settings
from shared.store.buffer import RedisBuffer
from shared.store.entry import LUA, load, parse
from shared.store.paging import RunEnd

pytestmark = pytest.mark.timeout(120)

# Both Lua functions applied to each entry given: {offset, ts, offset, ts, ...}.
PARSE_ALL = LUA + """
local out = {}
for i = 1, #ARGV do
  out[#out + 1] = entry_offset(ARGV[i])
  out[#out + 1] = entry_ts(ARGV[i])
end
return out
"""

messages = st.builds(
    Message,
    id=st.text(min_size=1, max_size=30),
    room=st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True),
    user=st.text(max_size=40),
    body=st.text(max_size=300),
    ts=st.integers(0, 2**53),
    client_msg_id=st.text(max_size=40),
    position=st.builds(Position, st.integers(0, 1023), st.integers(0, 2**53)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(messages, min_size=1, max_size=20))
async def test_lua_and_python_read_the_same_offset_and_ts_from_an_entry(redis: aioredis.Redis,
                                                                       batch: list[Message]) -> None:
    entries = [m.entry() for m in batch]
    got = await redis.eval(PARSE_ALL, 0, *entries)  # type: ignore[misc]
    assert got[0::2] == [parse(e).offset for e in entries]
    assert got[1::2] == [load(e)["ts"] for e in entries]
    assert [Message.from_entry(e) for e in entries] == batch


def model(offsets: list[int], before: int | None, w: int, after: int) -> tuple[list[int], RunEnd]:
    """What READ_RUN with a lower bound returns for a list of these offsets."""
    hi = len(offsets) if before is None else sum(1 for o in offsets if o < before)
    start = max(hi - w, 0)
    below = [i for i in range(hi) if offsets[i] <= after]
    if below and below[-1] >= start:
        return offsets[below[-1] + 1:hi], RunEnd.AFTER
    if below and below[-1] == start - 1:
        return offsets[start:hi], RunEnd.AFTER
    return offsets[start:hi], RunEnd.HEAD if start == 0 else RunEnd.MORE


async def test_a_range_read_returns_exactly_the_entries_between_the_bounds(settings: Settings,
                                                                          redis: aioredis.Redis) -> None:
    keys = Keys(settings.redis_prefix, settings.kafka_partitions)
    room = "store.range"
    rng = random.Random(19)
    offsets, at = [], rng.randint(0, 5)
    for _ in range(700):
        offsets.append(at)
        at += rng.randint(1, 4)
    p = keys.partition(room)
    await redis.delete(keys.msgs(room))
    await redis.rpush(keys.msgs(room), *[Message(f"m{o}", room, "u", "b", o, "", Position(p, o)).entry()
                                         for o in offsets])
    buffer = RedisBuffer(redis, keys)
    points = [-1, 0, offsets[0], offsets[0] + 1, offsets[-1], offsets[-1] + 1, 10**12,
              *rng.sample(range(offsets[-1] + 2), 40)]
    for before in [None, *points]:
        for after in points:
            for w in (1, 3, 51, 1000):
                if before is not None and before <= after + 1:
                    continue
                run, end = await buffer.read_run(room, before, w, after)
                assert ([e.offset for e in run], end) == model(offsets, before, w, after), (before, after, w)
    await redis.delete(keys.msgs(room))
