"""The send path's Kafka producer on librdkafka (confluent-kafka), behind the three calls the gateway
makes of aiokafka's producer: `start()`, `send()` (returns the delivery future), `stop()`.

Why not aiokafka here: per acknowledged record it costs the gateway 1.6-1.8x the CPU
(`python -m bench.producers`, bench/README.md), because librdkafka builds requests and does the
socket I/O on threads of its own, in C. The guarantees are the same settings: acks=all, idempotent
(a retry after a lost answer is not written twice), linger from the settings.

Delivery reports come on a thread that polls librdkafka; each resolves its record's asyncio future
on the event loop. Errors are aiokafka's KafkaError types, so the send path's handling holds for
either client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import Any, NamedTuple

from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError
from confluent_kafka import KafkaException, Producer

POLL_S = 0.1  # how long the delivery-report thread blocks in one poll (it wakes on a report)
log = logging.getLogger("roomcast.rdkafka")


class DeliveryFailed(KafkaError):
    """librdkafka gave up on a record (its message timeout, a fatal producer error, ...)."""

    retriable = True


class Delivered(NamedTuple):
    """Where the broker wrote a record (what aiokafka's RecordMetadata gives the send path)."""

    topic: str
    partition: int
    offset: int


class RdProducer:
    def __init__(self, config: dict[str, Any], start_timeout_s: float) -> None:
        self._config = config
        self._start_timeout_s = start_timeout_s
        self._producer: Producer | None = None
        self._poller: threading.Thread | None = None
        self._stopping = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        """Connect, and fail (KafkaConnectionError) when the cluster does not answer in time."""
        self._loop = asyncio.get_running_loop()
        self._producer = Producer({**self._config, "error_cb": self._on_error})
        try:
            await asyncio.to_thread(self._producer.list_topics, timeout=self._start_timeout_s)
        except KafkaException as e:
            raise KafkaConnectionError(f"no answer from {self._config['bootstrap.servers']}: {e}") from e
        self._poller = threading.Thread(target=self._poll, name="kafka-delivery-reports", daemon=True)
        self._poller.start()

    async def stop(self) -> None:
        """Wait (up to the start timeout) for the records still held to be answered, fail those that
        are not (DeliveryFailed: their senders may send them again), then stop."""
        if self._producer is None or self._stopping.is_set():
            return
        await asyncio.to_thread(self._producer.flush, self._start_timeout_s)
        self._producer.purge()
        await asyncio.to_thread(self._producer.flush, 0)  # (serves the purged records' reports)
        self._stopping.set()
        if self._poller is not None:
            await asyncio.to_thread(self._poller.join)

    async def send(
        self, topic: str, value: bytes, key: bytes | None = None, partition: int | None = None
    ) -> asyncio.Future[Delivered]:
        """Hand the record over; returns the future of its delivery (Delivered, or DeliveryFailed)."""
        assert self._producer is not None and self._loop is not None, "start() first"
        future: asyncio.Future[Delivered] = self._loop.create_future()
        loop = self._loop

        def on_delivery(err: Any, msg: Any) -> None:  # (on the polling thread)
            with contextlib.suppress(RuntimeError):  # (the loop is closed: nobody waits any more)
                loop.call_soon_threadsafe(_settle, future, err, msg)

        try:
            self._producer.produce(
                topic, value, key, partition=-1 if partition is None else partition, on_delivery=on_delivery
            )
        except BufferError as e:  # queue.buffering.max.messages reached: the broker is behind or away
            raise KafkaTimeoutError("the producer's queue is full") from e
        except KafkaException as e:
            raise DeliveryFailed(str(e)) from e
        return future

    def _poll(self) -> None:
        assert self._producer is not None
        while not self._stopping.is_set():
            self._producer.poll(POLL_S)

    def _on_error(self, err: Any) -> None:
        # Connection trouble is reported here and retried by librdkafka; the records' futures carry
        # what matters to a sender. A fatal error (the idempotent producer lost its sequence) fails
        # every record from then on: the node needs a restart.
        log.log(logging.ERROR if err.fatal() else logging.WARNING, "kafka producer: %s", err.str())


def _settle(future: asyncio.Future[Delivered], err: Any, msg: Any) -> None:
    if future.done():
        return
    if err is not None:
        future.set_exception(DeliveryFailed(err.str()))
    else:
        future.set_result(Delivered(msg.topic(), msg.partition(), msg.offset()))
