"""Sending: a send becomes a Kafka record (key = room, acks=all), acknowledged only once Kafka has it.

A resend of the same (user, client_msg_id) within the dedupe window gets the first ack again:
the first sender claims the dedupe key in Redis before producing, so a resend on another node
waits for that ack instead of producing a second copy. The claim holds the message's id and ts.
A produce the gateway stopped waiting for keeps its claim while the producer still holds the
record (through a broker outage), then records its ack or lets go. A produce that failed leaves
the claim as `retry`: the resend that takes it over publishes the SAME id and ts, because a failed
produce may still have reached Kafka (a broker that wrote the record and died before answering).
Two copies of one id are one message to the persister, MySQL, the fan-out and the client library.

The key's value and the scripts over it: shared.store.claims.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Awaitable
from typing import Any

import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from redis.exceptions import RedisError

from gateway import metrics
from shared.auth import Identity
from shared.cursor import Position
from shared.errors import BadRequest, Err, Forbidden, Unavailable
from shared.keys import Keys
from shared.message import Message, new_message_id
from shared.redisconn import run_scripts
from shared.settings import Settings
from shared.store import claims
from shared.store.claims import PENDING, RETRY
from shared.validation import ROOM_RULE, valid_room


def check_send(settings: Settings, identity: Identity, room: str, body: str) -> None:
    """What every send is held to before it is queued (the WebSocket `send`, `edit` and
    `delete`, and the publish API): the room's syntax and the token's `rooms`, the body's size.
    Raises BadRequest (or Forbidden)."""
    if not valid_room(room):
        raise BadRequest(Err.BAD_FRAME, ROOM_RULE)
    if not identity.may_access(room):
        raise Forbidden(f"no access to room {room}"[:120])
    if len(body) > settings.max_body_chars:
        raise BadRequest(Err.TOO_LARGE, f"body longer than {settings.max_body_chars} characters")


class Publisher:
    def __init__(self, settings: Settings, producer: AIOKafkaProducer, redis: aioredis.Redis) -> None:
        self.s = settings
        self.producer = producer
        self.redis = redis
        self.keys = Keys(settings.redis_prefix, settings.kafka_partitions)
        # The wait for a produce's answer ends this long after its claim was taken (the hand-over to
        # the producer counts: it waits up to the request timeout for room in a full batch while a
        # partition has no leader), then the claim is renewed: so it is renewed before its TTL ends.
        # Had it lapsed first, a resend would publish a second copy under a new id.
        self._produce_timeout = settings.kafka_request_timeout_ms / 1000 * 2
        self._pending_ttl = int(self._produce_timeout) + 5
        self._acks = AckWriter(redis, settings.dedupe_ttl_s)
        self._claim = redis.register_script(claims.CLAIM)
        self._renew_claim = redis.register_script(claims.RENEW)
        self._fail_claim = redis.register_script(claims.FAIL)
        self._late: set[asyncio.Task[None]] = set()  # produces that timed out, awaited to their end
        self.last_ok = self.last_failure = 0.0  # monotonic times of the last acked / failed produce

    async def close(self) -> None:
        """Shutdown, after the producer has stopped (it answered every record it held): settle the
        produces that had timed out, and write the acks gathered so far (the Redis client closes next)."""
        if self._late:
            await asyncio.wait(self._late, timeout=self._pending_ttl)
        await self._acks.close()

    def broker_trouble(self, window_s: float = 10.0) -> str | None:
        """Why sends fail now (the last produce failed within the window), else None."""
        if self.last_failure > self.last_ok and time.monotonic() - self.last_failure < window_s:
            return "the producer cannot reach the broker"
        return None

    async def claimed(self, user: str, room: str, client_msg_id: str) -> bool:
        """Whether a send (or edit, or delete) with this client_msg_id is acknowledged or in flight:
        a resend gets its ack from `send`, whatever it carries."""
        try:
            value = await self.redis.get(self.keys.sent(room, user, client_msg_id))
        except (RedisError, OSError) as e:
            raise Unavailable("dedupe store unavailable") from e
        raw = value.encode() if isinstance(value, str) else value
        return raw is not None and not raw.startswith(RETRY)

    def first_ack(self, user: str, room: str, client_msg_id: str) -> Awaitable[bytes]:
        """The ack of the send (or edit, or delete) with this client_msg_id that is acknowledged or in
        flight (`claimed`), once there is one; Unavailable when it failed meanwhile (send it again)."""
        return self._first_ack(self.keys.sent(room, user, client_msg_id))

    async def send(self, user: str, room: str, client_msg_id: str, body: str,
                   event: tuple[str, Message] | None = None) -> Awaitable[bytes]:
        """Claim the dedupe key and hand the record to the producer, in the caller's send order;
        returns an awaitable of the ack frame's JSON (the same bytes stored for a resend). Either step
        raises Unavailable when nothing can be promised (no ack is ever given for a record Kafka has
        not acknowledged). `event`: an edit or delete (its kind) of this stored message."""
        t0 = time.perf_counter()
        key = self.keys.sent(room, user, client_msg_id)
        try:
            taken = await self._claim(keys=[key], args=[f"{new_message_id()}|{int(time.time() * 1000)}",
                                                        self._pending_ttl])
        except (RedisError, OSError) as e:
            raise Unavailable("dedupe store unavailable") from e
        if taken is None:
            metrics.RESENDS.inc()
            return self._first_ack(key)
        claim = PENDING + taken
        msg_id, _, ts = taken.decode().partition("|")
        msg = Message(msg_id, room, user, body, int(ts), client_msg_id)
        if event is not None:
            kind, target = event
            assert target.position is not None
            msg = dataclasses.replace(msg, kind=kind, target=target.id, target_offset=target.position.offset)
        try:
            delivery = await self.producer.send(self.s.kafka_topic, msg.kafka_value(), key=room.encode(),
                                                partition=self.keys.partition(room))
        except (KafkaError, OSError) as e:
            self.last_failure = time.monotonic()
            await self._failed(key, claim)
            raise Unavailable(f"broker unavailable: {type(e).__name__}") from e
        return self._ack(key, claim, msg, delivery, t0)

    async def _ack(self, key: str, claim: bytes, msg: Message, delivery: asyncio.Future[Any], t0: float) -> bytes:
        try:
            md = await asyncio.wait_for(asyncio.shield(delivery), self._produce_timeout - (time.perf_counter() - t0))
        except TimeoutError as e:
            # The producer still holds the record (it waits out a broker outage), so it may reach
            # Kafka later: the claim stays pending until the producer knows, so a resend meanwhile
            # waits for this copy's ack instead of publishing a second copy.
            self.last_failure = time.monotonic()
            task = asyncio.create_task(self._settle_late(key, claim, msg, delivery), name="late-produce")
            self._late.add(task)
            task.add_done_callback(self._late.discard)
            raise Unavailable("broker unavailable: no answer yet") from e
        except (KafkaError, OSError) as e:
            self.last_failure = time.monotonic()
            await self._failed(key, claim)
            raise Unavailable(f"broker unavailable: {type(e).__name__}") from e
        self.last_ok = time.monotonic()
        ack_json = self._record(key, claim, msg, md)
        metrics.MESSAGES_IN.inc()
        metrics.SEND_ACK_SECONDS.observe(time.perf_counter() - t0)
        return ack_json

    def _record(self, key: str, claim: bytes, msg: Message, md: Any) -> bytes:
        acked = dataclasses.replace(msg, position=Position(md.partition, md.offset))
        ack_json = acked.ack()
        # Recorded in the background: the client need not wait for it (a resend meanwhile finds our
        # claim and waits for the ack to appear), and acks that complete together share one write.
        self._acks.put(key, claim, ack_json)
        return ack_json

    async def _settle_late(self, key: str, claim: bytes, msg: Message, delivery: asyncio.Future[Any]) -> None:
        """Keep the claim of a produce that timed out pending until the producer answers; then
        record its ack (it reached Kafka: a resend gets that ack) or leave it to a resend."""
        while not delivery.done():
            with contextlib.suppress(RedisError, OSError):  # (renewed: the claim lapses if we die)
                await self._renew_claim(keys=[key], args=[claim, self._pending_ttl])
            await asyncio.wait({delivery}, timeout=self._pending_ttl / 3)
        if delivery.cancelled() or delivery.exception() is not None:
            await self._failed(key, claim)
        else:
            self.last_ok = time.monotonic()
            self._record(key, claim, msg, delivery.result())

    async def _first_ack(self, key: str) -> bytes:
        deadline = time.monotonic() + self._pending_ttl
        while time.monotonic() < deadline:
            try:
                value = await self.redis.get(key)
            except (RedisError, OSError) as e:
                raise Unavailable("dedupe store unavailable") from e
            raw = value.encode() if isinstance(value, str) else value
            if raw is None or raw.startswith(RETRY):
                raise Unavailable("the first send of this client_msg_id failed; send it again")
            if claims.is_ack(raw):  # (anything else is a claim in flight)
                return raw
            await asyncio.sleep(0.05)
        raise Unavailable("the first send of this client_msg_id is still pending")

    async def _failed(self, key: str, claim: bytes) -> None:
        """The produce failed: a resend may publish again, under the same id and ts (for the dedupe
        window: the failed produce may still have reached Kafka). If Redis cannot be told, the
        pending claim lapses after its TTL and a resend then publishes under a new id."""
        with contextlib.suppress(RedisError, OSError):
            await self._fail_claim(keys=[key], args=[claim, self.s.dedupe_ttl_s])


class AckWriter:
    """Writes acks over their pending claims in Redis, off the ack path: the acks gathered over
    GATHER_S go out as one pipeline (one round trip per batch, not per send). Best effort: the
    message is in Kafka either way, and the persister records the first copy's ack when it applies
    the message (never overwritten here); until then a resend finds the claim and waits for it."""

    GATHER_S = 0.1

    def __init__(self, redis: aioredis.Redis, ttl_s: int) -> None:
        self._redis = redis
        self._ttl = ttl_s
        self._pending: dict[str, tuple[bytes, bytes]] = {}  # key -> (our claim, ack)
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._wakeup: asyncio.Future[None] | None = None  # while gathering: set early by close()
        self._record = redis.register_script(claims.RECORD_ACK)

    def put(self, key: str, claim: bytes, ack_json: bytes) -> None:
        self._pending[key] = (claim, ack_json)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._flush(), name="ack-writer")

    async def _flush(self) -> None:
        try:
            while self._pending:
                if not self._closing:
                    await self._gather()
                batch, self._pending = self._pending, {}
                try:
                    # (a script per key: keys of different partitions hash to different slots)
                    await run_scripts(self._redis, [(self._record, [key], [claim, ack, self._ttl])
                                                    for key, (claim, ack) in batch.items()])
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
