"""Everything one gateway process holds, built in the app's lifespan and handed to the endpoints."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import aiomysql
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer

from gateway.drain import Drain
from gateway.fanout import Fanout
from gateway.history import HistoryReader
from gateway.hub import Hub
from gateway.presence import Presence
from gateway.publisher import Publisher
from gateway.quota import Quota, Senders, UserState
from gateway.readstate import ReadState
from gateway.signals import Signals
from shared.keys import Keys
from shared.settings import Settings
from shared.store.archive import Archive
from shared.store.buffer import RedisBuffer


class TypingThrottle:
    """When each (user, room) last had a typing signal forwarded by this node; entries older than
    the interval are forgotten as new ones come in (so the map holds only the last interval's)."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last: dict[tuple[str, str], float] = {}  # insertion order is time order

    def allow(self, user: str, room: str) -> bool:
        now = time.monotonic()
        for key, first in list(itertools.islice(self._last.items(), 2)):
            if now - first < self.interval_s:
                break
            del self._last[key]
        last = self._last.get((user, room))
        if last is not None and now - last < self.interval_s:
            return False
        self._last.pop((user, room), None)
        self._last[(user, room)] = now
        return True


@dataclass
class Node:
    settings: Settings
    keys: Keys
    hub: Hub
    fanout: Fanout
    producer: AIOKafkaProducer
    publisher: Publisher
    redis: aioredis.Redis
    mysql: aiomysql.Pool
    history: HistoryReader
    signals: Signals
    presence: Presence
    reads: ReadState
    quota: Quota
    typing: TypingThrottle = field(default_factory=lambda: TypingThrottle(3.0))
    users: dict[str, UserState] = field(default_factory=dict)  # users with connections here
    senders: Senders = field(default_factory=Senders)  # users publishing over REST here
    unauthenticated: int = 0  # connections waiting for their auth frame
    drain: Drain = field(default_factory=Drain)

    @property
    def buffer(self) -> RedisBuffer:
        return self.history.buffer

    @property
    def archive(self) -> Archive:
        return self.history.archive

    def user(self, user: str) -> UserState:
        state = self.users.get(user)
        if state is None:
            state = self.users[user] = UserState()
        return state
