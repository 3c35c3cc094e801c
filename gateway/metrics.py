"""The gateway's Prometheus metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

CONNECTIONS = Gauge("roomcast_gateway_connections", "Open WebSocket connections")
UNAUTHENTICATED = Gauge("roomcast_gateway_unauthenticated_connections",
                        "WebSocket connections waiting for their auth frame")
JOINS = Counter("roomcast_gateway_joins_total", "Room joins")
MESSAGES_IN = Counter("roomcast_gateway_messages_in_total", "Sends acknowledged by Kafka")
DELIVERED = Counter("roomcast_gateway_messages_out_total", "Message frames queued to clients")
SEND_ACK_SECONDS = Histogram(
    "roomcast_gateway_send_ack_seconds", "From a send frame to its ack (Kafka acks=all)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
SLOW_DISCONNECTS = Counter("roomcast_gateway_slow_disconnects_total", "Clients closed 4008 (too slow)")
ERRORS = Counter("roomcast_gateway_error_frames_total", "Error frames sent", ["code"])
DUPLICATES_DROPPED = Counter("roomcast_gateway_duplicates_dropped_total", "Repeated message ids not fanned out")
RESENDS = Counter("roomcast_gateway_resends_total", "Sends answered from the dedupe record")
FANOUT_QUEUE = Gauge("roomcast_gateway_fanout_queue_frames", "Frames queued to clients, all connections")
FANOUT_LAG = Gauge("roomcast_gateway_fanout_lag_records", "Records between fan-out position and high-water mark",
                   ["partition"])
HISTORY_MYSQL_QUERIES = Counter("roomcast_gateway_history_mysql_queries_total",
                                "MySQL queries made for history pages (single-flight shares one between callers)")
HISTORY_PARTIAL_PAGES = Counter("roomcast_gateway_history_partial_pages_total",
                                "History pages served from Redis alone, short, because MySQL did not answer")
RESUMED = Counter("roomcast_gateway_resumed_messages_total",
                  "Missed messages replayed on a resume, by the store that served them", ["source"])
for _source in ("redis", "mysql", "kafka"):  # (each series exported from the start, at 0)
    RESUMED.labels(_source)
SIGNALS_OUT = Counter("roomcast_gateway_signals_out_total", "Signals produced to the signals topic", ["kind"])
SIGNALS_IN = Counter("roomcast_gateway_signals_in_total", "Signals consumed from the signals topic", ["kind"])
SIGNALS_FAILED = Counter("roomcast_gateway_signals_failed_total", "Signals the broker did not take (dropped)")
SIGNAL_FRAMES = Counter("roomcast_gateway_signal_frames_total", "Presence, typing and read frames queued to clients")
TYPING_DROPPED = Counter("roomcast_gateway_typing_dropped_total", "Typing frames within the interval (dropped)")
PRESENCE_ERRORS = Counter("roomcast_gateway_presence_errors_total", "Presence writes Redis did not take")
RESUME_READS = Counter("roomcast_gateway_resume_read_entries_total",
                       "Stored entries and log records read by resumes (what the resume budgets are charged)")
RESUMES_RUNNING = Gauge("roomcast_gateway_resumes_running", "Resumes reading or replaying now, all connections")
