"""A chat message and its three encodings: the Kafka record, the stored entry, the wire frame.

- Kafka value: what the gateway produced, without a position (the broker assigns it).
- Stored entry: the Kafka value plus its cursor; one JSON object per Redis list item (its format:
  shared.store.entry). History pages join stored entries, so they are serialised once, when persisted.
- Wire frame: `{"type":"message", ...stored entry}`, built once per node for its fan-out.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson
from ulid import ULID

from shared.cursor import Position
from shared.store import entry
from shared.validation import valid_room


def new_message_id(at_ms: int | None = None) -> str:
    """Server id: time-sortable and unique (ULID, 26 characters); `at_ms`: the time it sorts by
    (default now; a simulation passes its own clock's)."""
    return str(ULID() if at_ms is None else ULID.from_timestamp(at_ms / 1000))


@dataclass(frozen=True, slots=True)
class Message:
    id: str
    room: str
    user: str
    body: str
    ts: int  # UTC milliseconds at which the gateway accepted the send
    client_msg_id: str
    position: Position | None = None

    @property
    def cursor(self) -> str:
        return "" if self.position is None else str(self.position)

    def kafka_value(self) -> bytes:
        return orjson.dumps(
            {"id": self.id, "room": self.room, "user": self.user, "body": self.body,
             "ts": self.ts, "cmid": self.client_msg_id}
        )

    @classmethod
    def from_kafka(cls, value: bytes, partition: int, offset: int) -> Message:
        """The message a record holds. A record that is not one a gateway writes (not a JSON object,
        a field missing or of another type, a room name no gateway accepts: a producer outside
        roomcast) raises ValueError, KeyError or TypeError: it must reach neither clients nor storage."""
        d = orjson.loads(value)
        msg_id, room, user, body, ts, cmid = d["id"], d["room"], d["user"], d["body"], d["ts"], d.get("cmid", "")
        if not (isinstance(msg_id, str) and isinstance(user, str) and isinstance(body, str)
                and isinstance(cmid, str) and type(ts) is int):
            raise TypeError("not a roomcast message: a field of another type")
        if not valid_room(room):
            raise ValueError("not a roomcast message: not a room name")
        return cls(msg_id, room, user, body, ts, cmid, Position(partition, offset))

    def entry(self) -> bytes:
        """The stored form (Redis list item, history page item): shared.store.entry."""
        return entry.encode(self.id, self.room, self.user, self.body, self.ts, self.cursor, self.client_msg_id)

    @classmethod
    def from_entry(cls, raw: bytes | str) -> Message:
        d = entry.load(raw)
        return cls(d["id"], d["room"], d["user"], d["body"], int(d["ts"]), d.get("cmid", ""),
                   entry.position(d["cursor"]))

    def ack(self) -> bytes:
        """The `ack` frame its sender got (or gets again for a resend of the same client_msg_id)."""
        return orjson.dumps(
            {"type": "ack", "client_msg_id": self.client_msg_id, "id": self.id, "room": self.room,
             "cursor": self.cursor, "ts": self.ts}
        )

    def frame(self) -> bytes:
        """The `message` frame sent to subscribers."""
        return b'{"type":"message",' + self.entry()[1:]
