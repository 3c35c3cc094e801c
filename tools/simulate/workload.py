"""The simulated traffic: how much users send, to which rooms, when, and which history pages
readers ask for. Pure and seeded: one Workload gives the same sends and reads every time (only
the random half of each ULID message id differs; nothing is decided by it).

- Volume: `users x msgs_per_user_day` messages a day, spread over the day by a cosine curve that
  peaks at PEAK_HOUR with `peak_ratio` times the average rate. Counts per tick carry their
  fractions over, so a whole day sends exactly its volume.
- Rooms: `rooms` rooms with Zipf(`zipf`) popularity (a few busy rooms, many quiet ones, in a
  random order). A `short_lived` share of them is active only for an exponential span of mean
  `life_days` from a random start, then silent for good; the rest are active throughout. A
  message goes to an active room with probability proportional to its popularity.
- Reads: `reads_per_write` history pages per message sent, in the same tick. A read opens an
  active room by popularity (`read_active` of reads) or any room that has messages, uniformly;
  it asks for the newest page (`newest_share`), a page ending at a random point older than the
  retention (`deep_share`, up to twice the retention back), or at a random point within it.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
import string
from dataclasses import dataclass, field

from shared.cursor import Position
from shared.message import Message, new_message_id

DAY_S = 86_400
PEAK_HOUR = 15  # the busiest hour of the simulated day
ALPHABET = string.ascii_letters + string.digits + " " * 8


@dataclass(frozen=True)
class Workload:
    users: int = 400
    msgs_per_user_day: float = 100.0
    body_min: int = 20
    body_max: int = 100
    rooms: int = 500
    zipf: float = 1.1
    short_lived: float = 0.5
    life_days: float = 3.0
    peak_ratio: float = 1.8
    reads_per_write: float = 1.0
    read_active: float = 0.7
    newest_share: float = 0.8
    deep_share: float = 0.05
    days: int = 10
    tick_s: int = 60
    seed: int = 1

    def __post_init__(self) -> None:
        if self.users < 1 or self.rooms < 1 or self.days < 1 or self.msgs_per_user_day < 0:
            raise ValueError("users, rooms and days must be >= 1, messages per user >= 0")
        if not 1 <= self.body_min <= self.body_max:
            raise ValueError("body sizes: 1 <= min <= max")
        if not 1 <= self.peak_ratio <= 2:
            raise ValueError("peak_ratio must be within 1..2 (the quietest hour gets 2 - peak_ratio)")
        if self.tick_s < 1 or DAY_S % self.tick_s:
            raise ValueError("tick_s must divide a day")
        shares = (self.short_lived, self.read_active, self.newest_share, self.deep_share)
        if not all(0 <= s <= 1 for s in shares) or self.newest_share + self.deep_share > 1:
            raise ValueError("shares must be within 0..1 (newest + deep <= 1)")
        if self.reads_per_write < 0 or self.life_days <= 0 or self.zipf < 0:
            raise ValueError("reads_per_write >= 0, life_days > 0, zipf >= 0")

    @property
    def messages_per_day(self) -> float:
        return self.users * self.msgs_per_user_day

    def rate(self, t_s: float) -> float:
        """Messages per second at `t_s` seconds into the run (the daily curve)."""
        hour = (t_s % DAY_S) / 3600
        swing = (self.peak_ratio - 1) * math.cos(2 * math.pi * (hour - PEAK_HOUR) / 24)
        return self.messages_per_day / DAY_S * (1 + swing)

    def room_specs(self) -> list[RoomSpec]:
        rng = random.Random(f"{self.seed}-rooms")
        ranks = list(range(self.rooms))
        rng.shuffle(ranks)
        short = set(rng.sample(range(self.rooms), round(self.short_lived * self.rooms)))
        specs = []
        for i in range(self.rooms):
            start, end = 0.0, math.inf
            if i in short:
                start = rng.uniform(0, self.days * DAY_S)
                end = start + rng.expovariate(1 / (self.life_days * DAY_S))
            specs.append(RoomSpec(f"room-{i:05d}", 1 / (ranks[i] + 1) ** self.zipf, start, end))
        return specs


@dataclass(frozen=True, slots=True)
class RoomSpec:
    name: str
    weight: float  # popularity
    start_s: float  # active from (seconds into the run)
    end_s: float  # silent from (math.inf: never)


@dataclass(frozen=True, slots=True)
class Read:
    room: str
    before: str | None  # the page's cursor (None: the newest page)
    depth: str  # "newest", "recent" (within the retention) or "deep" (older)


@dataclass
class _Room:
    partition: int = -1
    ts: list[int] = field(default_factory=list)  # of its messages, in order
    offsets: list[int] = field(default_factory=list)


class Traffic:
    """The sends and reads of each tick. `record` tells it where the log put each message (reads
    pick their cursors among recorded messages)."""

    def __init__(self, w: Workload, start_ms: int, retention_s: int, page: int,
                 specs: list[RoomSpec] | None = None) -> None:
        self.w = w
        self.start_ms = start_ms
        self.retention_ms = retention_s * 1000
        self.page = page
        self.specs = w.room_specs() if specs is None else specs
        self.rng = random.Random(w.seed)
        self.sent = self.asked = 0  # messages sent, pages asked for
        self._expected_sends = self._expected_reads = 0.0
        self._rooms: dict[str, _Room] = {}
        self._with_messages: list[str] = []
        self._changes = sorted({t for s in self.specs for t in (s.start_s, s.end_s) if t < math.inf})
        self._active: list[str] = []
        self._cum: list[float] = []
        self._valid = (math.inf, -math.inf)  # the times for which _active holds: [from, until)

    def _active_at(self, t_s: float) -> tuple[list[str], list[float]]:
        if not self._valid[0] <= t_s < self._valid[1]:
            live = [s for s in self.specs if s.start_s <= t_s < s.end_s]
            self._active = [s.name for s in live]
            self._cum = list(itertools.accumulate(s.weight for s in live))
            i = bisect.bisect_right(self._changes, t_s)
            self._valid = (self._changes[i - 1] if i else -math.inf,
                           self._changes[i] if i < len(self._changes) else math.inf)
        return self._active, self._cum

    def sends(self, t0_ms: int, t1_ms: int) -> list[Message]:
        """The messages sent in [t0, t1), by ts (without positions: the log assigns them)."""
        w, rng = self.w, self.rng
        mid_s = ((t0_ms + t1_ms) / 2 - self.start_ms) / 1000
        before = round(self._expected_sends)
        self._expected_sends += w.rate(mid_s) * (t1_ms - t0_ms) / 1000
        n = round(self._expected_sends) - before
        names, cum = self._active_at(mid_s)
        if n <= 0 or not names:
            return []
        out = []
        stamps = sorted(rng.randrange(t0_ms, t1_ms) for _ in range(n))
        for ts, room in zip(stamps, rng.choices(names, cum_weights=cum, k=n), strict=True):
            body = "".join(rng.choices(ALPHABET, k=rng.randint(w.body_min, w.body_max)))
            user = f"user{rng.randrange(w.users):05d}"
            out.append(Message(new_message_id(ts), room, user, body, ts, f"{rng.getrandbits(128):032x}"))
        self.sent += len(out)
        return out

    def record(self, messages: list[Message]) -> None:
        for m in messages:
            assert m.position is not None
            room = self._rooms.get(m.room)
            if room is None:
                room = self._rooms[m.room] = _Room(m.position.partition)
                self._with_messages.append(m.room)
            room.ts.append(m.ts)
            room.offsets.append(m.position.offset)

    def reads(self, now_ms: int, sends: int) -> list[Read]:
        """The history pages asked for after a tick that sent `sends` messages."""
        before = round(self._expected_reads)
        self._expected_reads += sends * self.w.reads_per_write
        n = round(self._expected_reads) - before if self._with_messages else 0
        out = [self._read(now_ms) for _ in range(n)]
        self.asked += len(out)
        return out

    def _read(self, now_ms: int) -> Read:
        w, rng = self.w, self.rng
        r = rng.random()
        depth = "newest" if r < w.newest_share else "deep" if r < w.newest_share + w.deep_share else "recent"
        room_name = None
        if rng.random() < w.read_active:
            names, cum = self._active_at((now_ms - self.start_ms) / 1000)
            if names:
                room_name = rng.choices(names, cum_weights=cum)[0]
        if room_name is None or room_name not in self._rooms:
            room_name = rng.choice(self._with_messages)
        if depth == "newest":
            return Read(room_name, None, depth)
        age = rng.uniform(0, self.retention_ms) + (self.retention_ms if depth == "deep" else 0)
        room = self._rooms[room_name]
        n = len(room.ts)
        i = max(bisect.bisect_left(room.ts, now_ms - age), min(self.page, n))
        before = None if i >= n else str(Position(room.partition, room.offsets[i]))
        return Read(room_name, before, depth)
