"""Flush scheduling: which rooms' lists are past the cap and wait for a chunk move to MySQL, how
long a failed flush waits before the next try, and each room's list length as last seen."""

from __future__ import annotations

import asyncio
import random

from shared.store.buffer import excess


class FlushQueue:
    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.rooms: set[str] = set()
        self.lengths: dict[str, int] = {}  # room -> its list length, as last seen
        self.wakeup = asyncio.Event()

    def __bool__(self) -> bool:
        return bool(self.rooms)

    def add(self, room: str) -> None:
        self.rooms.add(room)

    def pop(self) -> str:
        return self.rooms.pop()

    def note(self, room: str, length: int) -> bool:
        """The room's list is `length` long now; queue it when over the cap. True when queued."""
        self.lengths[room] = length
        if excess(length, self.cap):
            self.rooms.add(room)
            return True
        return False

    def buffered(self) -> int:
        return sum(self.lengths.values())


class Backoff:
    """Waits between failed tries: doubling from `first` up to `most`, jittered by +-50 %."""

    def __init__(self, first: float = 0.1, most: float = 5.0) -> None:
        self.first, self.most = first, most
        self.delay = first

    def ok(self) -> None:
        self.delay = self.first

    def failed(self) -> float:
        """The wait before the next try."""
        wait = self.delay * (0.5 + random.random())
        self.delay = min(self.delay * 2, self.most)
        return wait
