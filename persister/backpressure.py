"""Back-pressure: what is buffered in Redis past the cap (MySQL slow or down) is the backlog; past
its budget the persister pauses consuming, and resumes once flushes brought it back under."""

from __future__ import annotations

import enum

from shared.store.buffer import excess


class Step(enum.Enum):
    KEEP = "keep"
    PAUSE = "pause"
    RESUME = "resume"


class Backlog:
    def __init__(self, cap: int, budget: int) -> None:
        self.cap = cap
        self.budget = budget
        self.rooms: dict[str, int] = {}  # room -> messages past the cap
        self.paused = False

    def note(self, room: str, length: int) -> None:
        """The room's list is `length` long now."""
        if over := excess(length, self.cap):
            self.rooms[room] = over
        else:
            self.rooms.pop(room, None)

    def total(self) -> int:
        return sum(self.rooms.values())

    def step(self) -> Step:
        """Pause past the budget, resume at or under it; each once per crossing."""
        over = self.total() > self.budget
        if over and not self.paused:
            self.paused = True
            return Step.PAUSE
        if not over and self.paused:
            self.paused = False
            return Step.RESUME
        return Step.KEEP
