"""The fan-out's reader of the log: every partition of the topic, no group, from its end at start,
with what the node's readiness asks of it (the high-water marks, when the broker last answered).

Two clients behind one interface (KAFKA_FANOUT_CLIENT): librdkafka (confluent-kafka), whose
fetching runs on threads of its own in C and costs a node ~2.6x less CPU per record at the tail than
aiokafka (`python -m bench.kafka_clients --workload tail`; +7.5 % deliveries per gateway CPU-second
in `roomcast bench fanout`), and aiokafka (the sends stay on aiokafka:
librdkafka's producer failed the fault suite, bench/README.md).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from confluent_kafka import Consumer, KafkaException
from confluent_kafka import TopicPartition as RdPartition

from shared.kafka import Fetched, all_partitions, decode_one, fetch, new_consumer, startup_retrying
from shared.settings import Settings

log = logging.getLogger("roomcast.gateway.tail")
Wanted = Callable[[bytes | None], bool]


class Tail(Protocol):
    async def start(self, at_beginning: bool = False) -> dict[int, int]:
        """Begin at the end of every partition (or at its beginning: a benchmark reading a log
        through); returns each partition's offset it begins at."""

    async def stop(self) -> None: ...

    async def fetch(self, wanted: Wanted) -> list[Fetched]:
        """The next records, per partition, those `wanted` accepts by key decoded; [] after about a
        second with nothing new."""

    def highwater(self, partition: int) -> int | None:
        """The partition's end as the last fetch answer gave it (None: not known yet)."""

    async def broker_end(self, partition: int) -> int:
        """The partition's end as the broker has it now (one request)."""

    def answered_ms(self, partition: int) -> float | None:
        """Wall-clock ms when the broker last answered for the partition (None: not yet)."""


def new_tail(settings: Settings) -> Tail:
    if settings.kafka_fanout_client == "librdkafka":
        return RdTail(settings)
    return AioTail(settings, new_consumer(settings))


class AioTail:
    def __init__(self, settings: Settings, consumer: AIOKafkaConsumer) -> None:
        self.topic = settings.kafka_topic
        self.consumer = consumer

    async def start(self, at_beginning: bool = False) -> dict[int, int]:
        await self.consumer.start()
        tps = await all_partitions(self.consumer, self.topic)
        self.consumer.assign(tps)
        await (self.consumer.seek_to_beginning if at_beginning else self.consumer.seek_to_end)(*tps)
        return {tp.partition: await self.consumer.position(tp) for tp in tps}

    async def stop(self) -> None:
        await self.consumer.stop()

    async def fetch(self, wanted: Wanted) -> list[Fetched]:
        return await fetch(self.consumer, timeout_ms=1000, max_records=5000, wanted=wanted)

    def highwater(self, partition: int) -> int | None:
        high: int | None = self.consumer.highwater(TopicPartition(self.topic, partition))
        return high

    async def broker_end(self, partition: int) -> int:
        tp = TopicPartition(self.topic, partition)
        return int((await self.consumer.end_offsets([tp]))[tp])

    def answered_ms(self, partition: int) -> float | None:
        # aiokafka stamps a partition whenever a fetch answer brings its high-water mark
        stamp: float | None = self.consumer.last_poll_timestamp(TopicPartition(self.topic, partition))
        return stamp


class RdTail:
    """librdkafka fetches on its own threads; one thread of ours takes its batches (`consume`) and
    hands them to the event loop, at most BATCHES_AHEAD ahead of the loop (back-pressure).

    Nothing else calls that consumer while it consumes (a call from another thread meanwhile, even
    the cached `get_watermark_offsets`, hung here): the high-water marks come from its statistics,
    and the broker's ends are asked of a second handle that never consumes."""

    MAX_BATCH = 5000
    BATCHES_AHEAD = 2
    STATS_MS = 1000  # librdkafka's statistics: when each broker last sent us anything

    def __init__(self, settings: Settings) -> None:
        self.topic = settings.kafka_topic
        self._settings = settings
        self._timeout_s = settings.kafka_request_timeout_ms / 1000
        self._config = {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"roomcast-tail-{settings.name}",  # (required; never joined: partitions are assigned)
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "fetch.wait.max.ms": (settings.kafka_fanout_fetch_wait_ms if settings.kafka_fanout_fetch_wait_ms is not None
                                  else settings.kafka_fetch_max_wait_ms),
            "fetch.min.bytes": settings.kafka_fanout_fetch_min_bytes,
            "queued.max.messages.kbytes": 16384,  # prefetched records held at most (a node far behind)
            "socket.nagle.disable": True,
            "statistics.interval.ms": self.STATS_MS,
            "stats_cb": self._on_stats,
            "client.id": f"roomcast-{settings.name}",
            "logger": logging.getLogger("roomcast.rdkafka"),
        }
        self._consumer: Consumer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: threading.Thread | None = None
        self._halt = threading.Event()
        self._ahead = threading.Semaphore(self.BATCHES_AHEAD)
        self._batches: collections.deque[list[Any]] = collections.deque()
        self._arrived: asyncio.Event | None = None
        self._answered_ms: dict[int, float] = {}
        self._high: dict[int, int] = {}
        self._offsets: Consumer | None = None  # asks the broker for ends (broker_end)
        self._offsets_lock = asyncio.Lock()
        self.failed: BaseException | None = None

    async def start(self, at_beginning: bool = False) -> dict[int, int]:
        self._loop = asyncio.get_running_loop()
        self._arrived = asyncio.Event()
        self._consumer = consumer = Consumer(self._config)
        try:
            # (asked again while the broker is in trouble: e.g. "Broker handle destroyed" while the
            # metadata changes after a broker fault, seen in the chaos test's gateway restarts)
            async for attempt in startup_retrying(self._settings, KafkaException):
                with attempt:
                    starts = await self._starts(consumer, at_beginning)
        except KafkaException:
            consumer.close()
            raise
        consumer.assign([RdPartition(self.topic, p, offset) for p, offset in starts.items()])
        self._offsets = Consumer({k: v for k, v in self._config.items() if not k.startswith("stat")})
        now = time.time() * 1000
        self._answered_ms = dict.fromkeys(starts, now)
        self._reader = threading.Thread(target=self._read, name="fanout-tail", daemon=True)
        self._reader.start()
        return starts

    async def _starts(self, consumer: Consumer, at_beginning: bool) -> dict[int, int]:
        """Each partition's start or end offset, from the broker."""
        topics = (await asyncio.to_thread(consumer.list_topics, self.topic, self._timeout_s)).topics
        partitions = sorted(topics[self.topic].partitions) if self.topic in topics else []
        if not partitions or topics[self.topic].error is not None:
            raise KafkaException(f"topic {self.topic!r} has no partitions")
        return {p: (await asyncio.to_thread(consumer.get_watermark_offsets, RdPartition(self.topic, p),
                                            self._timeout_s))[0 if at_beginning else 1] for p in partitions}

    async def stop(self) -> None:
        if self._consumer is None or self._halt.is_set():
            return
        self._halt.set()
        if self._reader is not None:
            await asyncio.to_thread(self._reader.join)
        self._consumer.close()
        if self._offsets is not None:
            self._offsets.close()

    def _read(self) -> None:
        """(The reader thread.) librdkafka's batches to the loop, until halted."""
        assert self._consumer is not None and self._loop is not None
        try:
            while not self._halt.is_set():
                if not self._ahead.acquire(timeout=0.5):
                    continue  # (the loop has not taken the last batches yet)
                # (poll first: `consume` waits for a full batch or its timeout, whichever comes
                # first; then take at once what else is already queued)
                first = self._consumer.poll(0.5)
                records = [first, *self._consumer.consume(self.MAX_BATCH - 1, 0)] if first is not None else []
                if records:
                    self._loop.call_soon_threadsafe(self._arrive, records)
                else:
                    self._ahead.release()
        except BaseException as e:  # handed to the loop, which raises it from fetch
            self.failed = e
            self._loop.call_soon_threadsafe(self._arrive, [])

    def _arrive(self, records: list[Any]) -> None:
        assert self._arrived is not None
        self._batches.append(records)
        self._arrived.set()

    async def fetch(self, wanted: Wanted) -> list[Fetched]:
        assert self._arrived is not None
        if not self._batches:
            try:
                await asyncio.wait_for(self._arrived.wait(), 1.0)
            except TimeoutError:
                pass
        if self.failed is not None:
            raise self.failed
        if not self._batches:
            return []
        records = self._batches.popleft()
        if not self._batches:
            self._arrived.clear()
        self._ahead.release()
        return self._decode(records, wanted)

    def _decode(self, records: list[Any], wanted: Wanted) -> list[Fetched]:
        by_partition: dict[int, Fetched] = {}
        for r in records:
            if r.error() is not None:
                log.warning("fan-out fetch error", extra={"error": r.error().str()})
                continue
            partition, offset = r.partition(), r.offset()
            fetched = by_partition.get(partition)
            if fetched is None:
                fetched = by_partition[partition] = Fetched(TopicPartition(self.topic, partition), [], offset, offset)
            fetched.next_offset = offset + 1
            if wanted(r.key()) and (msg := decode_one(r.value(), partition, offset)) is not None:
                fetched.messages.append(msg)
        return list(by_partition.values())

    def highwater(self, partition: int) -> int | None:
        return self._high.get(partition)

    async def broker_end(self, partition: int) -> int:
        assert self._offsets is not None
        async with self._offsets_lock:
            low_high = await asyncio.to_thread(self._offsets.get_watermark_offsets,
                                               RdPartition(self.topic, partition), self._timeout_s)
        return int(low_high[1])

    def answered_ms(self, partition: int) -> float | None:
        return self._answered_ms.get(partition)

    def _on_stats(self, stats_json: str) -> None:
        """(On the reader thread, every STATS_MS.) Each partition's high-water mark (`hi_offset`, from
        the last fetch answer); it was last answered when its leader last sent us anything (`rxidle`:
        µs since the last receive on that connection)."""
        stats = orjson.loads(stats_json)
        now = time.time() * 1000
        idle_by_node = {b["nodeid"]: b["rxidle"] for b in stats.get("brokers", {}).values()
                        if b.get("nodeid", -1) >= 0 and b.get("rxidle", -1) >= 0}
        for p, part in stats.get("topics", {}).get(self.topic, {}).get("partitions", {}).items():
            if int(p) < 0:
                continue  # (librdkafka's "unassigned" pseudo-partition)
            if part.get("hi_offset", -1) >= 0:
                self._high[int(p)] = part["hi_offset"]
            if (idle := idle_by_node.get(part.get("leader", -1))) is not None:
                self._answered_ms[int(p)] = now - idle / 1000
