"""This node's sessions: which are in which room (handing a message to all of them), and when
their tokens expire (closing them then, idle or not)."""

from __future__ import annotations

import asyncio
import heapq
import math
import time

from gateway.protocol import Close
from gateway.session import Session


class Hub:
    def __init__(self) -> None:
        self._rooms: dict[str, set[Session]] = {}
        self.sessions: set[Session] = set()
        # Token expiry: sessions by the whole second their token expires in (a JWT's exp is whole
        # seconds), and ONE timer for the earliest such second, rather than a timer per connection.
        self._expiring: dict[int, set[Session]] = {}
        self._seconds: list[int] = []  # heap of the seconds in _expiring (and of some emptied since)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_second: int | None = None

    def add(self, session: Session) -> None:
        self.sessions.add(session)
        expires_at = session.identity.expires_at
        if expires_at is None:
            return
        second = math.ceil(expires_at)
        sessions = self._expiring.get(second)
        if sessions is None:
            sessions = self._expiring[second] = set()
            if len(self._seconds) > 2 * len(self._expiring) + 64:  # mostly emptied seconds: rebuild
                self._seconds = list(self._expiring)
                heapq.heapify(self._seconds)
            else:
                heapq.heappush(self._seconds, second)
            if self._timer_second is None or second < self._timer_second:
                self._schedule(second)
        sessions.add(session)

    def join(self, room: str, session: Session) -> None:
        self._rooms.setdefault(room, set()).add(session)
        session.rooms.add(room)

    def leave(self, room: str, session: Session) -> None:
        members = self._rooms.get(room)
        if members is not None:
            members.discard(session)
            if not members:
                del self._rooms[room]
        session.rooms.discard(room)
        session.stop_recovering(room)

    def drop(self, session: Session) -> None:
        for room in list(session.rooms):
            self.leave(room, session)
        self.sessions.discard(session)
        if session.identity.expires_at is not None:
            second = math.ceil(session.identity.expires_at)
            sessions = self._expiring.get(second)
            if sessions is not None:
                sessions.discard(session)
                if not sessions:  # (its second stays in the heap; the timer skips it)
                    del self._expiring[second]
                    if not self._expiring and self._timer is not None:
                        self._timer.cancel()
                        self._timer = self._timer_second = None
                        self._seconds.clear()

    def publish(self, room: str, offset: int, frame: str, wire: bytes | None = None) -> int:
        """Hand one pre-serialised frame (`wire`: as a WebSocket frame) to every member; returns
        how many got it."""
        members = self._rooms.get(room)
        if not members:
            return 0
        # No copy of the set: delivering never changes a room's members (a session closed for being
        # too slow leaves its rooms later, when its connection ends).
        for s in members:
            s.deliver(room, offset, frame, wire)
        return len(members)

    def has_room(self, room: str) -> bool:
        return room in self._rooms

    @property
    def room_count(self) -> int:
        return len(self._rooms)

    # --- token expiry
    def _schedule(self, second: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_second = second
        self._timer = asyncio.get_running_loop().call_later(max(0.0, second - time.time()), self._expire)

    def _expire(self) -> None:
        self._timer = self._timer_second = None
        now = time.time()
        while self._seconds:
            second = self._seconds[0]
            if second in self._expiring and second > now:
                self._schedule(second)
                return
            heapq.heappop(self._seconds)
            for session in self._expiring.pop(second, ()):
                session.close(Close.BAD_TOKEN, "token expired")
