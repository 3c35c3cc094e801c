"""Everything one gateway process holds, built in the app's lifespan and handed to the endpoints."""

from __future__ import annotations

from dataclasses import dataclass, field

import aiomysql
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer

from gateway.fanout import Fanout
from gateway.history import HistoryReader
from gateway.hub import Hub
from gateway.publisher import Publisher
from gateway.quota import Quota, UserState
from shared.keys import Keys
from shared.settings import Settings


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
    quota: Quota
    users: dict[str, UserState] = field(default_factory=dict)  # users with connections here
    unauthenticated: int = 0  # connections waiting for their auth frame
    draining: bool = False

    def user(self, user: str) -> UserState:
        state = self.users.get(user)
        if state is None:
            state = self.users[user] = UserState()
        return state
