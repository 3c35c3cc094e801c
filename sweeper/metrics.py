"""The sweeper's Prometheus metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

ROOMS_SCANNED = Counter("roomcast_sweeper_rooms_scanned_total", "Rooms whose metadata a sweep read")
ROOMS_MOVED = Counter("roomcast_sweeper_rooms_moved_total", "Rooms from which a sweep moved messages")
MESSAGES_MOVED = Counter("roomcast_sweeper_messages_moved_total", "Messages moved from Redis to MySQL")
CHUNK_SECONDS = Histogram(
    "roomcast_sweeper_chunk_seconds", "Time to handle one chunk of rooms (without the pause)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
SWEEPS = Counter("roomcast_sweeper_sweeps_total", "Sweeps over every room, by outcome", ["outcome"])
SWEEP_SECONDS = Gauge("roomcast_sweeper_last_sweep_seconds", "Duration of the last complete sweep")
LAST_SUCCESS = Gauge("roomcast_sweeper_last_success_timestamp_seconds", "When the last complete sweep ended")
ROOM_ERRORS = Counter("roomcast_sweeper_room_errors_total", "Rooms skipped for unreadable entries")
CONTENDED = Counter("roomcast_sweeper_contended_moves_total", "Moves whose chunk another mover trimmed first")
