"""Signals: what every gateway must hear but nothing stores (presence changes, typing, read syncs
and receipts). They travel on their own topic (`chat.signals`, key = room, short retention),
produced cheaply (acks=1: a lost signal is a missed indicator, never lost data), and every gateway
reads every partition from the end, like the fan-out. No signal is in history or replayed.

A record is one JSON object: `{"k":"presence","room","user","state"}`, `{"k":"typing","room","user"}`
or `{"k":"read","room","user","cursor","receipt":BOOL,"from":CONN}`; `from` names the connection
that sent the mark (it got its echo already), `receipt` says whether the room's other members get it.
"""

from __future__ import annotations

import asyncio
import logging
import time

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError

from gateway import metrics
from gateway.hub import Hub
from gateway.wire import text_frame
from shared.kafka import all_partitions
from shared.keys import Keys
from shared.settings import Settings

log = logging.getLogger("roomcast.gateway.signals")


def new_signal_producer(settings: Settings) -> AIOKafkaProducer:
    return AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks=1, linger_ms=5,
                            request_timeout_ms=settings.kafka_request_timeout_ms,
                            client_id=f"roomcast-{settings.name}-signals")


class Signals:
    def __init__(self, settings: Settings, hub: Hub, producer: AIOKafkaProducer, consumer: AIOKafkaConsumer) -> None:
        self.s = settings
        self.hub = hub
        self.producer = producer
        self.consumer = consumer
        self.keys = Keys(settings.redis_prefix, settings.kafka_partitions)
        self.node = f"{settings.name}/{time.time_ns():x}"  # this process, as `from` names it
        self._sending: set[asyncio.Future[None]] = set()

    async def start(self) -> None:
        await self.producer.start()
        await self.consumer.start()
        tps = await all_partitions(self.consumer, self.s.kafka_signals_topic)
        self.consumer.assign(tps)
        await self.consumer.seek_to_end(*tps)

    async def stop(self) -> None:
        await self.producer.stop()
        await self.consumer.stop()

    # --- out
    def publish(self, room: str, signal: dict[str, object]) -> None:
        """Hand a signal to the producer without waiting for the broker (best effort: a failure is
        counted, never raised)."""
        metrics.SIGNALS_OUT.labels(str(signal["k"])).inc()
        task = asyncio.ensure_future(self._send(room, orjson.dumps({**signal, "room": room})))
        self._sending.add(task)
        task.add_done_callback(self._sent)

    async def _send(self, room: str, value: bytes) -> None:
        delivery = await self.producer.send(self.s.kafka_signals_topic, value, key=room.encode(),
                                            partition=self.keys.partition(room))
        await delivery

    def _sent(self, task: asyncio.Future[None]) -> None:
        self._sending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            metrics.SIGNALS_FAILED.inc()
            if not isinstance(task.exception(), (KafkaError, OSError)):
                log.error("signal not sent", exc_info=task.exception())

    def conn_id(self, session: object) -> str:
        """A connection's name in `from`, unique across gateways."""
        return f"{self.node}/{id(session):x}"

    # --- in
    async def run(self) -> None:
        while True:
            batch = await self.consumer.getmany(timeout_ms=1000, max_records=5000)
            for records in batch.values():
                for r in records:
                    try:
                        self.dispatch(orjson.loads(r.value))
                    except (ValueError, KeyError, TypeError, AttributeError):
                        log.error("undecodable signal skipped", extra={"partition": r.partition, "offset": r.offset})

    def dispatch(self, sig: dict[str, object]) -> None:
        kind, room, user = sig["k"], sig["room"], sig["user"]
        if not isinstance(room, str) or not isinstance(user, str):
            raise TypeError("room and user are strings")
        metrics.SIGNALS_IN.labels(str(kind)).inc()
        if kind == "presence":
            targets = list(self.hub.watching(room))
            frame = {"type": "presence_event", "room": room, "user": user, "state": sig["state"]}
        elif kind == "typing":
            targets = [s for s in self.hub.room_sessions(room) if s.identity.user != user]
            frame = {"type": "typing", "room": room, "user": user}
        elif kind == "read":
            origin = sig.get("from")
            targets = [s for s in self.hub.user_sessions(user) if self.conn_id(s) != origin]
            if sig.get("receipt"):
                targets += [s for s in self.hub.room_sessions(room) if s.identity.user != user]
            frame = {"type": "read", "room": room, "user": user, "cursor": sig["cursor"]}
        else:
            return
        if not targets:
            return
        payload = orjson.dumps(frame)
        text, wire = payload.decode(), text_frame(payload)
        for session in targets:
            session.push(text, wire)
        metrics.SIGNAL_FRAMES.inc(len(targets))

