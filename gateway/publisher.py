"""Sending: a send becomes a Kafka record (key = room, acks=all), acknowledged only once Kafka has it.

A resend of the same (user, client_msg_id) within the dedupe window gets the first ack again:
the first sender claims the dedupe key in Redis before producing, so a resend on another node
waits for that ack instead of producing a second copy. A produce that failed without a definite
answer (a timeout: the record may still reach Kafka) keeps its claim for DEDUPE_SETTLE_MS, so a
resend meanwhile gets the stored copy's ack instead of publishing it twice.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable
from typing import Any

import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from redis.exceptions import RedisError

from gateway import metrics
from shared.cursor import Position
from shared.keys import Keys
from shared.message import Message, new_message_id
from shared.settings import Settings

PENDING = b"pending"

# Claims are released (expired in ARGV[1] ms; 0 deletes) and acks recorded only over our own
# pending claim: once the persister has stored the message it records the first copy's ack in the
# same key, and that must survive (a produce that timed out may still have reached Kafka; the
# resend then gets that ack).
EXPIRE_CLAIM = """
if redis.call('GET', KEYS[1]) == 'pending' then return redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return 0
"""
RECORD_ACK = """
if redis.call('GET', KEYS[1]) == 'pending' then redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) end
"""


class Unavailable(Exception):
    """Kafka (or the dedupe store) could not take the send; no ack was given."""


class Publisher:
    def __init__(self, settings: Settings, producer: AIOKafkaProducer, redis: aioredis.Redis) -> None:
        self.s = settings
        self.producer = producer
        self.redis = redis
        self.keys = Keys(settings.redis_prefix, settings.kafka_partitions)
        self._produce_timeout = settings.kafka_request_timeout_ms / 1000 * 2
        self._pending_ttl = int(self._produce_timeout) + 5
        self._acks = AckWriter(redis, settings.dedupe_ttl_s)
        self._expire_claim = redis.register_script(EXPIRE_CLAIM)
        self.last_ok = self.last_failure = 0.0  # monotonic times of the last acked / failed produce

    async def close(self) -> None:
        """Shutdown, after the producer has stopped: write the acks gathered so far (the Redis client
        closes next)."""
        await self._acks.close()

    def broker_trouble(self, window_s: float = 10.0) -> str | None:
        """Why sends fail now (the last produce failed within the window), else None."""
        if self.last_failure > self.last_ok and time.monotonic() - self.last_failure < window_s:
            return "the producer cannot reach the broker"
        return None

    async def send(self, user: str, room: str, client_msg_id: str, body: str) -> Awaitable[bytes]:
        """Claim the dedupe key and hand the record to the producer, in the caller's send order;
        returns an awaitable of the ack frame's JSON (the same bytes stored for a resend). Either step
        raises Unavailable when nothing can be promised (no ack is ever given for a record Kafka has
        not acknowledged)."""
        t0 = time.perf_counter()
        key = self.keys.sent(room, user, client_msg_id)
        try:
            claimed = await self.redis.set(key, PENDING, nx=True, ex=self._pending_ttl)
        except (RedisError, OSError) as e:
            raise Unavailable("dedupe store unavailable") from e
        if not claimed:
            metrics.RESENDS.inc()
            return self._first_ack(key)
        msg = Message(new_message_id(), room, user, body, int(time.time() * 1000), client_msg_id)
        try:
            delivery = await self.producer.send(self.s.kafka_topic, msg.kafka_value(), key=room.encode(),
                                                partition=self.keys.partition(room))
        except (KafkaError, OSError) as e:
            self.last_failure = time.monotonic()
            await self._release(key, after_ms=0)  # (the producer did not take it: resend at once)
            raise Unavailable(f"broker unavailable: {type(e).__name__}") from e
        return self._ack(key, msg, delivery, t0)

    async def _ack(self, key: str, msg: Message, delivery: asyncio.Future[Any], t0: float) -> bytes:
        try:
            md = await asyncio.wait_for(delivery, self._produce_timeout)
        except (KafkaError, TimeoutError, OSError) as e:
            self.last_failure = time.monotonic()
            await self._release(key, after_ms=self.s.dedupe_settle_ms)  # (it may still reach Kafka)
            raise Unavailable(f"broker unavailable: {type(e).__name__}") from e
        self.last_ok = time.monotonic()
        acked = dataclasses.replace(msg, position=Position(md.partition, md.offset))
        ack_json = acked.ack()
        # Recorded in the background: the client need not wait for it (a resend meanwhile finds our
        # claim and waits for the ack to appear), and acks that complete together share one write.
        self._acks.put(key, ack_json)
        metrics.MESSAGES_IN.inc()
        metrics.SEND_ACK_SECONDS.observe(time.perf_counter() - t0)
        return ack_json

    async def _first_ack(self, key: str) -> bytes:
        deadline = time.monotonic() + self._pending_ttl
        while time.monotonic() < deadline:
            try:
                raw = await self.redis.get(key)
            except (RedisError, OSError) as e:
                raise Unavailable("dedupe store unavailable") from e
            if raw is None:
                raise Unavailable("the first send of this client_msg_id failed; send it again")
            if raw != PENDING:
                return raw if isinstance(raw, bytes) else raw.encode()
            await asyncio.sleep(0.05)
        raise Unavailable("the first send of this client_msg_id is still pending")

    async def _release(self, key: str, after_ms: int) -> None:
        """Let a resend produce again `after_ms` from now. Until then a resend waits for the ack the
        persister records over the claim if it stores a copy that reached Kafka after all (a failed
        produce may still land). Claims left unreleased expire after the pending TTL."""
        try:
            await self._expire_claim(keys=[key], args=[after_ms])
        except (RedisError, OSError):
            pass


class AckWriter:
    """Writes acks over their pending claims in Redis, off the ack path: the acks gathered over
    GATHER_S go out as one pipeline (one round trip per batch, not per send). Best effort: the
    message is in Kafka either way, and the persister records the first copy's ack when it applies
    the message (never overwritten here); until then a resend finds the claim and waits for it."""

    GATHER_S = 0.1

    def __init__(self, redis: aioredis.Redis, ttl_s: int) -> None:
        self._redis = redis
        self._ttl = ttl_s
        self._pending: dict[str, bytes] = {}
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._wakeup: asyncio.Future[None] | None = None  # while gathering: set early by close()
        self._record = redis.register_script(RECORD_ACK)

    def put(self, key: str, ack_json: bytes) -> None:
        self._pending[key] = ack_json
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._flush(), name="ack-writer")

    async def _flush(self) -> None:
        try:
            while self._pending:
                if not self._closing:
                    await self._gather()
                batch, self._pending = self._pending, {}
                try:
                    if len(batch) == 1:
                        ((key, value),) = batch.items()
                        await self._record(keys=[key], args=[value, self._ttl])
                    else:  # (a script per key: keys of different partitions hash to different slots)
                        async with self._redis.pipeline(transaction=False) as pipe:
                            for key, value in batch.items():
                                await self._record(keys=[key], args=[value, self._ttl], client=pipe)
                            await pipe.execute()
                except (RedisError, OSError):
                    pass
        finally:
            self._task = None

    async def _gather(self) -> None:
        loop = asyncio.get_running_loop()
        self._wakeup = wakeup = loop.create_future()
        timer = loop.call_later(self.GATHER_S, _wake, wakeup)
        try:
            await wakeup
        finally:
            timer.cancel()
            self._wakeup = None

    async def close(self) -> None:
        """Write what is gathered without waiting out the gathering time; returns once it is written
        (or the write failed)."""
        self._closing = True
        if self._wakeup is not None:
            _wake(self._wakeup)
        while self._task is not None:
            await asyncio.wait({self._task})


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
