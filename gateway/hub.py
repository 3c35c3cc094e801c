"""This node's sessions: which are in which room (handing a message to all of them), and when
their tokens expire (closing them then, idle or not)."""

from __future__ import annotations

import asyncio
import math
import time

from gateway.protocol import Close
from gateway.session import Session


class Hub:
    def __init__(self) -> None:
        self._rooms: dict[str, set[Session]] = {}
        self.sessions: set[Session] = set()
        # Token expiry: sessions by the whole second their token expires in (a JWT's exp is whole
        # seconds), swept by ONE timer ticking each second while any wait, not a timer per connection.
        self._expiring: dict[int, set[Session]] = {}
        self._swept = 0  # every second up to this one has been swept (while the ticker runs)
        self._ticker: asyncio.TimerHandle | None = None

    def add(self, session: Session) -> None:
        self.sessions.add(session)
        expires_at = session.identity.expires_at
        if expires_at is None:
            return
        if self._ticker is None:
            self._swept = math.floor(time.time())
        second = math.ceil(expires_at)
        if second <= self._swept:  # expired already
            session.close(Close.BAD_TOKEN, "token expired")
            return
        self._expiring.setdefault(second, set()).add(session)
        if self._ticker is None:
            self._tick_later()

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
                if not sessions:
                    del self._expiring[second]  # (the ticker stops at its next tick if none are left)

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
    def _tick_later(self) -> None:
        """Tick just after the next whole second (the loop's clock is not time.time())."""
        delay = self._swept + 1 - time.time() + 0.01
        self._ticker = asyncio.get_running_loop().call_later(max(0.0, delay), self._tick)

    def _tick(self) -> None:
        now = math.floor(time.time())
        for second in range(self._swept + 1, now + 1):
            for session in self._expiring.pop(second, ()):
                session.close(Close.BAD_TOKEN, "token expired")
        self._swept = max(self._swept, now)
        self._ticker = None
        if self._expiring:
            self._tick_later()
