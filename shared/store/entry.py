"""The stored entry: one JSON object per message, as kept in a room's Redis list and served in
history pages. Its fields are a message's, plus its `cursor` ("<partition>-<offset>").

Everything that reads a position or an id out of an entry does it here: in Python with `parse`,
inside Redis scripts with the Lua functions of LUA (a test holds the two to the same answers).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from shared.cursor import Position


def encode(id: str, room: str, user: str, body: str, ts: int, cursor: str, cmid: str) -> bytes:
    return orjson.dumps({"id": id, "room": room, "user": user, "body": body, "ts": ts, "cursor": cursor,
                         "cmid": cmid})


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
    user: str = ""


def parse(raw: bytes) -> Entry:
    d = orjson.loads(raw)
    cursor = d["cursor"]
    return Entry(position(cursor).offset, d["id"], cursor, raw, d["user"])


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
