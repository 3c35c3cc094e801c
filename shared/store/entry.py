"""The stored entry: one JSON object per record of a room (a message, an edit or a delete), as kept
in a room's Redis list and served in history pages. Its fields are a message's, plus its `cursor`
("<partition>-<offset>"), and the message's current state:

- a message edited since: `edited_ts` (the edit's time) and `rev` (the edit's offset: the newer
  state wins wherever two copies meet, e.g. MySQL's upsert);
- a message deleted since (a tombstone): only `id`, `room`, `ts`, `cursor` and `"deleted":true`;
- an edit or delete event: `kind` ("edit"/"delete"), `target` (the message's id) and `toff` (its
  offset); an edit whose message was deleted since keeps no body or user (`"deleted":true`).

Everything that reads a position or an id out of an entry does it here: in Python with `parse`,
inside Redis scripts with the Lua functions of LUA (a test holds the two to the same answers).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from shared.cursor import Position

MESSAGE, EDIT, DELETE = "message", "edit", "delete"


def encode(id: str, room: str, user: str, body: str, ts: int, cursor: str, cmid: str, *, kind: str = MESSAGE,
           target: str = "", toff: int = -1, edited_ts: int | None = None, rev: int = -1,
           deleted: bool = False) -> bytes:
    d: dict[str, Any] = {}
    if kind != MESSAGE:
        d.update(kind=kind, target=target, toff=toff)
    if deleted:
        return orjson.dumps({"id": id, "room": room, "ts": ts, "cursor": cursor, **d, "deleted": True})
    d = {"id": id, "room": room, "user": user, "body": body, "ts": ts, "cursor": cursor, "cmid": cmid, **d}
    if edited_ts is not None:
        d.update(edited_ts=edited_ts, rev=rev)
    return orjson.dumps(d)


def position(cursor: str) -> Position:
    """The position of a stored entry's cursor (always "<partition>-<offset>", offset >= 0)."""
    part, _, off = cursor.rpartition("-")
    return Position(int(part), int(off))


def load(raw: bytes | str) -> dict[str, Any]:
    """The entry's fields (`cursor` as stored; `position` turns it into a Position)."""
    fields: dict[str, Any] = orjson.loads(raw)
    return fields


@dataclass(frozen=True, slots=True)
class Entry:
    """A stored entry (its JSON, as kept in Redis) with what paging needs from it."""

    offset: int
    id: str
    cursor: str
    raw: bytes
    user: str = ""  # ("" in a tombstone)
    event: bool = False  # an edit or a delete (not a message: history pages leave it out)
    deleted: bool = False


def parse(raw: bytes) -> Entry:
    d = orjson.loads(raw)
    cursor = d["cursor"]
    return Entry(position(cursor).offset, d["id"], cursor, raw, d.get("user", ""), "kind" in d, "deleted" in d)


def dedupe(entries: Iterable[Entry]) -> list[Entry]:
    """Entries (oldest first) without repeated ids; the first (oldest) position wins. (A message is
    in both stores for a moment, moved but not yet trimmed; a producer retry's copy has one id.)"""
    seen: set[str] = set()
    out: list[Entry] = []
    for e in entries:
        if e.id not in seen:
            seen.add(e.id)
            out.append(e)
    return out


# Prepended to every Redis script that reads entries: the Lua side of `parse`.
LUA = """
local function entry_offset(raw)
  return tonumber(string.match(cjson.decode(raw)['cursor'], '(%d+)$'))
end
local function entry_ts(raw)
  return cjson.decode(raw)['ts']
end
"""
