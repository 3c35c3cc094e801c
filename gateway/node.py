"""Everything one gateway process holds, built in the app's lifespan and handed to the endpoints."""

from __future__ import annotations

from dataclasses import dataclass, field

import aiomysql
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer

from gateway.fanout import Fanout
from gateway.history import HistoryReader
from gateway.hub import Hub
from gateway.limits import TokenBucket
from gateway.publisher import Publisher
from shared.keys import Keys
from shared.settings import Settings


@dataclass(slots=True)
class UserState:
    connections: int = 0
    bucket: TokenBucket | None = None


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
    users: dict[str, UserState] = field(default_factory=dict)
    unauthenticated: int = 0  # connections waiting for their auth frame
    draining: bool = False

    def user(self, user: str) -> UserState:
        state = self.users.get(user)
        if state is None:
            state = self.users[user] = UserState(
                bucket=TokenBucket(self.settings.send_rate_per_s, self.settings.send_burst))
        return state
