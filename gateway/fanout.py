"""The node's fan-out consumer: every partition, no group, from "now". A record of a room with no
member here is skipped by its key (the room) without decoding its value: every node reads every
record, so that is what a record costs a node it is not for (docs/scaling.md). The others are
decoded and serialised once, then queued for this node's members of the room."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

from gateway import metrics
from gateway.hub import Hub
from gateway.tail import Tail
from gateway.wire import text_frame
from shared.settings import Settings

log = logging.getLogger("roomcast.gateway.fanout")


class RecentIds:
    """A bounded set of recently delivered message ids (a producer retry can write one twice)."""

    def __init__(self, size: int) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._size = size

    def add(self, msg_id: str) -> bool:
        """False when the id was seen already."""
        if msg_id in self._ids:
            return False
        self._ids[msg_id] = None
        if len(self._ids) > self._size:
            self._ids.popitem(last=False)
        return True


class Fanout:
    def __init__(self, settings: Settings, hub: Hub, tail: Tail) -> None:
        self.s = settings
        self.hub = hub
        self.tail = tail
        self.partitions: list[int] = []
        self.positions: dict[int, int] = {}  # partition -> next offset this node will deliver
        self.recent = RecentIds(50_000)
        self.started = False
        self.failed: BaseException | None = None  # set when the consume loop died
        self.last_poll = time.monotonic()  # the consume loop came round (even with nothing new)
        self.last_advance = time.monotonic()  # a record was consumed
        self.started_ms = 0.0  # wall clock (ms), as the tail stamps fetch answers

    async def start(self, at_beginning: bool = False) -> None:
        """From the end of every partition (at_beginning: a benchmark reading a log through)."""
        self.positions = await self.tail.start(at_beginning)
        self.partitions = sorted(self.positions)
        self.started = True
        self.started_ms = time.time() * 1000
        log.info("fan-out consuming", extra={"partitions": len(self.partitions)})

    async def stop(self) -> None:
        await self.tail.stop()

    async def run(self) -> None:
        while True:
            batch = await self.tail.fetch(self.hub.has_room_key)
            self.last_poll = time.monotonic()
            if not batch:
                continue
            self.last_advance = self.last_poll
            delivered = 0
            for fetched in batch:
                self.positions[fetched.tp.partition] = fetched.next_offset
                for msg in fetched.messages:
                    if not self.recent.add(msg.id):
                        metrics.DUPLICATES_DROPPED.inc()
                        continue
                    assert msg.position is not None
                    payload = msg.frame()
                    delivered += self.hub.publish(msg.room, msg.position.offset, payload.decode(), text_frame(payload))
            metrics.DELIVERED.inc(delivered)

    def position(self, partition: int) -> int:
        return self.positions.get(partition, 0)

    def end(self, partition: int) -> int:
        """The partition's end (the offset its next record will get) as this node last saw it."""
        return max(self.position(partition), self.tail.highwater(partition) or 0)

    async def broker_end(self, partition: int) -> int:
        """The partition's end as the broker has it now (one request)."""
        return await self.tail.broker_end(partition)

    def lag_by_partition(self) -> dict[int, int]:
        """Records between this node's position and the high-water mark of the last fetch."""
        out = {}
        for partition in self.partitions:
            high = self.tail.highwater(partition)
            out[partition] = max(0, high - self.positions.get(partition, 0)) if high is not None else 0
        return out

    def lag(self) -> int:
        return sum(self.lag_by_partition().values())

    def broker_silence_s(self) -> float:
        """Seconds since the broker last answered a fetch, for the partition answered longest ago.
        A broker that is cut off answers nothing, so the lag looks like 0 while nothing arrives."""
        stamps = [self.tail.answered_ms(p) or self.started_ms for p in self.partitions]
        return max(0.0, time.time() * 1000 - min(stamps)) / 1000 if stamps else 0.0

    def ready(self) -> tuple[bool, str]:
        """Not ready when this node would accept clients but not deliver to them (a "deaf" node)."""
        if self.failed is not None:
            return False, f"fan-out consumer died: {self.failed!r}"
        if not self.started:
            return False, "fan-out consumer not started"
        now = time.monotonic()
        if now - self.last_poll > self.s.ready_stall_s:
            return False, "fan-out loop stuck"
        if (silence := self.broker_silence_s()) > self.s.ready_stall_s:
            return False, f"fan-out: no fetch answered by the broker for {silence:.0f}s"
        lag = self.lag()
        if lag > self.s.ready_max_lag:
            return False, f"fan-out lag {lag} > {self.s.ready_max_lag}"
        if lag > 0 and now - self.last_advance > self.s.ready_stall_s:
            return False, f"fan-out not advancing with {lag} records to deliver"
        return True, "ok"
