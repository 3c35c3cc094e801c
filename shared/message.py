"""A chat message, or an edit or delete of one (an event: `kind`), and its three encodings: the
Kafka record, the stored entry, the wire frame.

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
    # An event (kind edit/delete) names its message: `target` (id) at `target_offset` (same partition);
    # its `id` is the event's own (dedupe), its `ts` the edit's time, its `body` (edits) the new text.
    kind: str = entry.MESSAGE
    target: str = ""
    target_offset: int = -1
    # A stored message's state since (shared.store.entry): its last edit's time and offset, or deleted.
    edited_ts: int | None = None
    rev: int = -1
    deleted: bool = False

    @property
    def cursor(self) -> str:
        return "" if self.position is None else str(self.position)

    @property
    def is_event(self) -> bool:
        return self.kind != entry.MESSAGE

    def kafka_value(self) -> bytes:
        d: dict[str, object] = {"id": self.id, "room": self.room, "user": self.user, "body": self.body,
                                "ts": self.ts, "cmid": self.client_msg_id}
        if self.is_event:
            d.update(kind=self.kind, target=self.target, toff=self.target_offset)
        return orjson.dumps(d)

    @classmethod
    def from_kafka(cls, value: bytes, partition: int, offset: int) -> Message:
        """The message a record holds. A record that is not one a gateway writes (not a JSON object,
        a field missing or of another type, a room name no gateway accepts: a producer outside
        roomcast) raises ValueError, KeyError or TypeError: it must reach neither clients nor storage."""
        d = orjson.loads(value)
        msg_id, room, user, body, ts, cmid = d["id"], d["room"], d["user"], d["body"], d["ts"], d.get("cmid", "")
        kind, target, toff = d.get("kind", entry.MESSAGE), d.get("target", ""), d.get("toff", -1)
        if not (isinstance(msg_id, str) and isinstance(user, str) and isinstance(body, str)
                and isinstance(cmid, str) and type(ts) is int and isinstance(target, str) and type(toff) is int):
            raise TypeError("not a roomcast message: a field of another type")
        if kind not in (entry.MESSAGE, entry.EDIT, entry.DELETE):
            raise ValueError(f"unknown record kind {kind!r}")
        if not valid_room(room):
            raise ValueError("not a roomcast message: not a room name")
        return cls(msg_id, room, user, body, ts, cmid, Position(partition, offset), kind, target, toff)

    def entry(self) -> bytes:
        """The stored form (Redis list item, history page item): shared.store.entry."""
        return entry.encode(self.id, self.room, self.user, self.body, self.ts, self.cursor, self.client_msg_id,
                            kind=self.kind, target=self.target, toff=self.target_offset,
                            edited_ts=self.edited_ts, rev=self.rev, deleted=self.deleted)

    @classmethod
    def from_entry(cls, raw: bytes | str) -> Message:
        d = entry.load(raw)
        edited = d.get("edited_ts")
        return cls(d["id"], d["room"], d.get("user", ""), d.get("body", ""), int(d["ts"]), d.get("cmid", ""),
                   entry.position(d["cursor"]), d.get("kind", entry.MESSAGE), d.get("target", ""),
                   int(d.get("toff", -1)), None if edited is None else int(edited), int(d.get("rev", -1)),
                   bool(d.get("deleted", False)))

    def ack(self) -> bytes:
        """The `ack` frame its sender got (or gets again for a resend of the same client_msg_id). An
        edit's or delete's ack names the message (`id`) and the event (`event`, its own id)."""
        d: dict[str, object] = {"type": "ack", "client_msg_id": self.client_msg_id,
                                "id": self.target if self.is_event else self.id, "room": self.room,
                                "cursor": self.cursor, "ts": self.ts}
        if self.is_event:
            d["event"] = self.id
        return orjson.dumps(d)

    def frame(self) -> bytes:
        """The frame sent to subscribers: `message` (as stored: a tombstone shows no body or user),
        or `edit` / `delete` with the event's own cursor."""
        if self.kind == entry.EDIT:
            return orjson.dumps({"type": "edit", "room": self.room, "id": self.target, "body": self.body,
                                 "user": self.user, "edited_ts": self.ts, "cursor": self.cursor})
        if self.kind == entry.DELETE:
            return orjson.dumps({"type": "delete", "room": self.room, "id": self.target, "user": self.user,
                                 "cursor": self.cursor})
        return b'{"type":"message",' + self.entry()[1:]
