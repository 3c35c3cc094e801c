"""The gateway's per-message Kafka path on librdkafka (confluent-kafka), driven from asyncio.

Every sent message is produced once and consumed back by every gateway, so this is where the
gateway spends most of its CPU. Measured here (bench/README.md): aiokafka's pure-Python protocol
costs ~6 % of a core per gateway just to poll 8 partitions every 10 ms, librdkafka ~1 %; producing
200 msgs/s with acks=all cost 12.5 % vs 6.9 %. librdkafka does the network work in its own threads;
asyncio only sees finished batches and delivery reports, handed over with call_soon_threadsafe.
The persister, recovery and admin calls stay on aiokafka (group management, short-lived reads).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from typing import Any, NamedTuple

import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from shared.settings import Settings

log = logging.getLogger("roomcast.gateway.kafka")


class ProduceError(Exception):
    """The record was not acknowledged (broker unreachable, timed out, or refused)."""


class Delivered(NamedTuple):
    partition: int
    offset: int


def _common(settings: Settings) -> dict[str, Any]:
    return {
        "bootstrap.servers": settings.kafka_bootstrap,
        "client.id": f"roomcast-{settings.name}",
        "socket.connection.setup.timeout.ms": settings.kafka_request_timeout_ms,
        "socket.nagle.disable": True,  # small requests go out now, not after the peer's delayed ACK
        "error_cb": _log_error,
    }


def _log_error(err: KafkaError) -> None:
    # Transport errors are retried by librdkafka; the publisher and /readyz report their effect.
    log.warning("kafka client error", extra={"error": str(err)})


class RdProducer:
    """acks=all producer: `send` enqueues a record and returns a future of its (partition, offset).

    One poller thread serves librdkafka's delivery reports; the reports of one poll reach the
    event loop together, in one wake-up."""

    def __init__(self, settings: Settings) -> None:
        self._timeout_ms = settings.kafka_request_timeout_ms * 2
        self.timeout_s = self._timeout_ms / 1000  # a record is acknowledged or failed within this
        self._producer = Producer({
            **_common(settings),
            "acks": "all",
            "enable.idempotence": settings.kafka_idempotence,
            "linger.ms": settings.kafka_linger_ms,
            "request.timeout.ms": settings.kafka_request_timeout_ms,
            "message.timeout.ms": self._timeout_ms,  # a record not acknowledged by then fails
        })
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reports: list[tuple[asyncio.Future[Delivered], KafkaError | None, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="kafka-producer-poll", daemon=True)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        # Fail at start-up, as aiokafka does, when the broker cannot be reached at all.
        await self._loop.run_in_executor(None, self._producer.list_topics, None, self._timeout_ms / 1000)
        self._thread.start()

    def send(self, topic: str, value: bytes, key: bytes, partition: int) -> asyncio.Future[Delivered]:
        assert self._loop is not None, "start() first"
        fut: asyncio.Future[Delivered] = self._loop.create_future()

        def report(err: KafkaError | None, msg: Message) -> None:  # runs in the poller thread
            self._reports.append((fut, err, msg.partition() or 0, msg.offset() or 0))

        try:
            self._producer.produce(topic, value, key, partition=partition, on_delivery=report)
        except (BufferError, KafkaException) as e:
            raise ProduceError(str(e)) from e
        return fut

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.1)
            self._hand_over()

    def _hand_over(self) -> None:
        if self._reports and self._loop is not None:
            reports, self._reports = self._reports, []
            with contextlib.suppress(RuntimeError):  # the loop closed during shutdown
                self._loop.call_soon_threadsafe(_settle, reports)

    async def stop(self) -> None:
        """Deliver what is still buffered (bounded by the produce timeout), then stop polling."""
        self._stop.set()
        if self._thread.is_alive():
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        left = await asyncio.get_running_loop().run_in_executor(None, self._producer.flush, self._timeout_ms / 1000)
        self._hand_over()
        if left:
            log.error("producer stopped with undelivered records", extra={"records": left})


def _settle(reports: list[tuple[asyncio.Future[Delivered], KafkaError | None, int, int]]) -> None:
    for fut, err, partition, offset in reports:
        if fut.done():
            continue
        if err is None:
            fut.set_result(Delivered(partition, offset))
        else:
            fut.set_exception(ProduceError(err.str()))


class Record(NamedTuple):
    partition: int
    offset: int
    value: bytes


class RdFanoutConsumer:
    """Reads every partition of the topic (no group) in a thread and hands batches to the loop.

    The thread consumes the next batch only once the loop has taken the previous one, so a busy
    loop is never handed more than one batch (librdkafka's own prefetch queue is bounded too).
    Seeks are done by the thread, between batches."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.topic = topic
        self._timeout_s = settings.kafka_request_timeout_ms / 1000
        self._consumer = Consumer({
            **_common(settings),
            "group.id": f"roomcast-fanout-{settings.name}",  # required by the client; never joined
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "fetch.wait.max.ms": settings.kafka_fetch_max_wait_ms,
            "fetch.min.bytes": 1,
            "queued.max.messages.kbytes": 16384,
            "statistics.interval.ms": 1000,
            "stats_cb": self._on_stats,
        })
        self.connected = True  # a broker connection is up (from librdkafka's statistics, once a second)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._batches: asyncio.Queue[list[Record]] = asyncio.Queue(maxsize=1)
        self._taken: queue.SimpleQueue[bool] = queue.SimpleQueue()  # the loop took a batch (or: stop)
        self._seeks: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()
        self._high: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kafka-fanout", daemon=True)

    async def start(self) -> dict[int, int]:
        """Assign every partition at its end and start reading; returns partition -> start offset.

        "The end" is good enough here: nobody is subscribed before the node starts serving, so a
        start a batch early (Tansu's end offsets can be, ../shared/KAFKA.md) delivers to no one."""
        self._loop = asyncio.get_running_loop()
        starts = await self._loop.run_in_executor(None, self._ends)
        self._consumer.assign([TopicPartition(self.topic, p, off) for p, off in starts.items()])
        self._high = dict(starts)
        self._thread.start()
        return starts

    def _ends(self) -> dict[int, int]:
        deadline = time.monotonic() + 30
        while True:
            meta = self._consumer.list_topics(self.topic, self._timeout_s).topics.get(self.topic)
            if meta is not None and meta.error is None and meta.partitions:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"topic {self.topic!r} has no partitions")
            time.sleep(0.1)
        return {p: self._consumer.get_watermark_offsets(TopicPartition(self.topic, p), self._timeout_s)[1]
                for p in sorted(meta.partitions)}

    def _run(self) -> None:
        partitions = list(self._high)
        next_high = 0.0
        while not self._stop.is_set():
            while not self._seeks.empty():
                partition, offset = self._seeks.get()
                self._consumer.seek(TopicPartition(self.topic, partition, offset))
            # poll returns as soon as one record is there; consume(timeout=0) adds what is queued.
            first = self._consumer.poll(0.1)
            msgs = [] if first is None else [first, *self._consumer.consume(4999, 0)]
            if (now := time.monotonic()) >= next_high:  # from the last fetch responses, no request
                next_high = now + 0.2
                for p in partitions:
                    with contextlib.suppress(KafkaException):
                        _, high = self._consumer.get_watermark_offsets(TopicPartition(self.topic, p), cached=True)
                        if high >= 0:
                            self._high[p] = high
            records = []
            for m in msgs:
                if m.error() is not None:
                    log.warning("fan-out fetch error", extra={"error": str(m.error())})
                    continue
                records.append(Record(m.partition() or 0, m.offset() or 0, m.value() or b""))
            try:
                assert self._loop is not None
                self._loop.call_soon_threadsafe(self._batches.put_nowait, records)
            except RuntimeError:  # the loop closed during shutdown
                return
            self._taken.get()

    async def getmany(self) -> list[Record]:
        """The next batch (empty when nothing arrived within ~100 ms)."""
        records = await self._batches.get()
        self._taken.put(True)
        return records

    def _on_stats(self, stats_json: str) -> None:  # in the consume thread
        brokers = orjson.loads(stats_json).get("brokers", {}).values()
        self.connected = any(b.get("state") == "UP" for b in brokers if b.get("nodeid", -1) >= 0)

    def seek(self, partition: int, offset: int) -> None:
        self._seeks.put((partition, offset))

    def highwater(self, partition: int) -> int | None:
        return self._high.get(partition)

    async def stop(self) -> None:
        self._stop.set()
        self._taken.put(False)
        if self._thread.is_alive():
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        await asyncio.get_running_loop().run_in_executor(None, self._consumer.close)
