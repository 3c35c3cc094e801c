"""From the measured run to other sizes, on paper: the constants a run yields and the formulas that
carry them to N users. Pure (results dicts in, numbers out), so the report shows the same
arithmetic it uses.

Memory at N users (rooms scale with users, each room as busy as in the run):

    mem(N) = startup + N/U x (cached x b_msg + rooms x b_room) + dedupe(N)
    dedupe(N) = N x msgs_per_user_day / 86,400 x peak_ratio x dedupe_ttl_s x (b_sent + b_seen)

with U, cached (messages in Redis) and rooms (meta hashes) from the run's last day, b_* the
MEMORY USAGE per message, room, sent key and seen id. Under `message` a list holds at most the
retention's volume, which the run's last days reach. Under `list` the run's end is not the steady
state: an active room's list leaves Redis only once the room is idle, so a quiet room's list keeps
growing to the cap; its long-run figure takes every room with a list at the mean length of a list
that has reached the cap (it is flushed back by FLUSH_CHUNK: between cap - chunk + 1 and cap):
cached = lists x (BUFFER_CAP - FLUSH_CHUNK / 2). The persister's outage buffer
(persister_backlog_budget messages past the caps while MySQL is down) comes on top: budget x b_msg.

Fork copy-on-write of an AOF rewrite at N users: the rewrite of a dataset D takes T = D / S
(S: the run's rewrite speed), peak-hour writes go on meanwhile, and each dirties pages:

    cow(N) = min(D, c0 + k x rate_peak(N) x T)

c0 is what a rewrite costs with (almost) no writes (the child's own memory, the parent's busy
pages), k the bytes copied per message written during a stretched rewrite (the day's two rewrites
subtracted), and the worst case takes every message to dirty PAGES_PER_MESSAGE pages of its own.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

DAY_S = 86_400
PAGE = 4096
# Pages one applied message can write to when it shares none: its list's tail node, its meta hash,
# its seen set, its new sent key (the key, its value, and the keyspace and expires tables' entries).
PAGES_PER_MESSAGE = 6


def _div(a: float, b: float) -> float:
    return a / b if b else 0.0


@dataclass(frozen=True)
class Constants:
    users: int
    cached: int  # messages in Redis at the end
    rooms: int  # meta hashes at the end
    lists: int  # rooms with a list at the end
    full: float  # the mean length of a list that has reached the cap (BUFFER_CAP - FLUSH_CHUNK / 2)
    b_msg: float  # MEMORY USAGE per cached message (its list's share included)
    b_payload: float  # of which the entry's own bytes
    b_room: float  # per meta hash
    b_sent: float  # per sent key
    b_seen: float  # per id in a seen set
    startup: int  # used_memory of an empty Redis


def constants(run: dict[str, Any], users: int, cap: int, chunk: int) -> Constants:
    last = run["days"][-1]["memory"]
    k = last["kinds"]
    return Constants(
        users, k["lists"]["items"], k["meta"]["keys"], k["lists"]["keys"], cap - chunk / 2,
        _div(k["lists"]["sampled_bytes"], k["lists"]["sampled_items"]),
        _div(k["lists"]["sampled_payload"], k["lists"]["sampled_items"]),
        _div(k["meta"]["sampled_bytes"], k["meta"]["sampled"]),
        _div(k["sent"]["sampled_bytes"], k["sent"]["sampled"]),
        _div(k["seen"]["sampled_bytes"], k["seen"]["sampled_items"]),
        last["startup"])


@dataclass(frozen=True)
class Memory:
    lists: float
    rooms: float
    dedupe: float
    startup: float
    outage: float  # the persister's backlog budget at b_msg

    @property
    def total(self) -> float:
        return self.lists + self.rooms + self.dedupe + self.startup


def long_run_cached(c: Constants, policy: str) -> float:
    """Messages in Redis once the policy's steady state is reached (see the module's docstring)."""
    return c.lists * c.full if policy == "list" else c.cached


def memory(c: Constants, users: int, w: dict[str, Any], s: dict[str, Any], cached: float | None = None) -> Memory:
    """At the peak hour, with the run's cached messages (or `cached` of them) at U users."""
    f = users / c.users
    dedupe_live = users * w["msgs_per_user_day"] / DAY_S * w["peak_ratio"] * s["dedupe_ttl_s"]
    in_lists = c.cached if cached is None else cached
    return Memory(f * in_lists * c.b_msg, f * c.rooms * c.b_room, dedupe_live * (c.b_sent + c.b_seen), c.startup,
                  s["persister_backlog_budget"] * c.b_msg)


@dataclass(frozen=True)
class Fork:
    c0: float  # bytes copied by a rewrite with (almost) no writes
    k: float  # bytes copied per message written during the rewrite
    speed: float  # dataset bytes rewritten per second
    rewrites: int  # how many the figures come from


def fork(runs: list[dict[str, Any]]) -> Fork:
    plain, per_message, speeds = [], [], []
    for run in runs:
        by_day: dict[int, dict[float, dict[str, Any]]] = {}
        for r in run["rewrites"]:
            by_day.setdefault(r["day"], {})[r["window_s"]] = r
        for pair in by_day.values():
            fast = pair.get(0.0)
            if fast is None:
                continue
            plain.append(fast["cow"])
            speeds.append(_div(fast["used"], fast["seconds"]))
            slow = [r for window, r in pair.items() if window > 0]
            if slow and slow[0]["messages"] > fast["messages"]:
                per_message.append((slow[0]["cow"] - fast["cow"]) / (slow[0]["messages"] - fast["messages"]))
    return Fork(statistics.median(plain) if plain else 0.0, statistics.median(per_message) if per_message else 0.0,
                statistics.median(speeds) if speeds else 0.0, len(plain))


@dataclass(frozen=True)
class Cow:
    dataset: float
    seconds: float  # the rewrite's duration
    messages: float  # written during it at the peak rate
    measured: float  # cow with k
    worst: float  # cow with PAGES_PER_MESSAGE pages per message


def cow(f: Fork, dataset: float, users: int, w: dict[str, Any]) -> Cow:
    seconds = _div(dataset, f.speed)
    messages = users * w["msgs_per_user_day"] / DAY_S * w["peak_ratio"] * seconds
    return Cow(dataset, seconds, messages, min(dataset, f.c0 + f.k * messages),
               min(dataset, f.c0 + PAGES_PER_MESSAGE * PAGE * messages))
