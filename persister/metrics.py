"""The persister's Prometheus metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from shared.store.mover import Mover

APPLIED = Counter("roomcast_persister_applied_total", "Kafka records applied to Redis")
FLUSHED = Counter("roomcast_persister_flushed_messages_total", "Messages moved from Redis to MySQL")
FLUSH_BATCH = Histogram("roomcast_persister_flush_batch_size", "Messages per MySQL flush",
                        buckets=(1, 10, 25, 50, 100, 200, 500))
FLUSH_SECONDS = Histogram("roomcast_persister_flush_seconds", "Duration of one chunk move to MySQL")
FLUSH_ERRORS = Counter("roomcast_persister_flush_errors_total", "Failed chunk moves (MySQL or Redis away)")
LOG_SKIPPED = Counter("roomcast_persister_log_skipped_records_total",
                      "Records retention deleted before the persister applied them (lost from storage)")
REDIS_ERRORS = Counter("roomcast_persister_redis_errors_total", "Failed Redis calls (retried)")
FENCED = Counter("roomcast_persister_fenced_batches_total",
                 "Batches Redis refused because the partition's applied mark had moved (another persister "
                 "applied it, or Redis lost data): nothing written, the partition read again from the stored mark")
OWNED = Gauge("roomcast_persister_partitions", "Partitions this persister owns")
LAG = Gauge("roomcast_persister_lag_records", "Records between the applied mark and the high-water mark",
            ["partition"])
BUFFERED = Gauge("roomcast_persister_buffered_messages", "Messages in the Redis lists of the rooms seen since start")
BACKLOG = Gauge("roomcast_persister_backlog_messages", "Messages buffered in Redis past the cap")
INSERT_STATEMENTS = Gauge("roomcast_persister_mysql_insert_statements",
                          "MySQL statements that inserted messages since start")
ROWS_INSERTED = Gauge("roomcast_persister_mysql_rows_inserted", "Message rows inserted since start")


def bind_mover(mover: Mover) -> None:
    INSERT_STATEMENTS.set_function(lambda: mover.insert_statements)
    ROWS_INSERTED.set_function(lambda: mover.rows_inserted)
