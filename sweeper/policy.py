"""What the sweeper does with one room, decided from the room's metadata alone (pure).

The persister keeps per room `first_ts` (ts of the list's oldest entry; absent when the list is
empty) and `last_ts` (ts of the newest message ever appended). Two policies (settings.sweep_policy):

- "message": entries older than the retention leave Redis, newer ones stay cached. Entries leave
  oldest first and in list order, so with clock skew between gateways an old entry behind a newer
  one waits until the newer one is old too.
- "list": a room idle for longer than the retention (newest message older than it) has its whole
  list moved; an active room keeps its list as it is (the cap bounds it).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal


class Action(enum.Enum):
    NOTHING = "nothing"
    MOVE_OLD = "move_old"  # move entries with ts < cutoff, stop at the first newer one
    MOVE_ALL = "move_all"  # move the whole list (all of it is past the retention: the room is idle)


@dataclass(frozen=True, slots=True)
class Meta:
    first_ts: int | None
    last_ts: int | None


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    cutoff_ms: int  # entries with ts < cutoff are older than the retention


def parse_meta(first_ts: bytes | str | None, last_ts: bytes | str | None) -> Meta:
    """Meta from the raw HMGET answer; unreadable fields count as absent."""
    return Meta(_int(first_ts), _int(last_ts))


def _int(raw: bytes | str | None) -> int | None:
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        return None


def decide(meta: Meta, now_ms: int, retention_s: int, policy: Literal["message", "list"]) -> Decision:
    cutoff = now_ms - retention_s * 1000
    if meta.first_ts is None:  # empty list (or no metadata): nothing to move
        return Decision(Action.NOTHING, cutoff)
    if policy == "message":
        return Decision(Action.MOVE_OLD if meta.first_ts < cutoff else Action.NOTHING, cutoff)
    idle = meta.last_ts is not None and meta.last_ts < cutoff
    return Decision(Action.MOVE_ALL if idle else Action.NOTHING, cutoff)
