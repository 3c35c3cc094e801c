"""This node's sessions: which are in which room (handing a message to all of them), which belong
to which user, which want presence events, and when their tokens expire (closing them then, idle
or not). `on_member` hears when a user's first session joins a room here and when the last leaves
(gateway/presence.py)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Set

from gateway.protocol import Close
from gateway.session import Session


class Hub:
    def __init__(self) -> None:
        self._rooms: dict[str, set[Session]] = {}
        self.sessions: set[Session] = set()
        self._users: dict[str, set[Session]] = {}
        self._watching: dict[str, set[Session]] = {}  # room -> sessions that joined with presence:true
        self._members: dict[tuple[str, str], int] = {}  # (room, user) -> this node's sessions of it
        self.on_member: Callable[[str, str, bool], None] | None = None  # (room, user, first joined / last left)
        # Token expiry: sessions by the whole second their token expires in (a JWT's exp is whole
        # seconds), swept by ONE timer ticking each second while any wait, not a timer per connection.
        self._expiring: dict[int, set[Session]] = {}
        self._swept = 0  # every second up to this one has been swept (while the ticker runs)
        self._ticker: asyncio.TimerHandle | None = None

    def add(self, session: Session) -> None:
        self.sessions.add(session)
        self._users.setdefault(session.identity.user, set()).add(session)
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

    def join(self, room: str, session: Session, presence: bool = False) -> None:
        self._rooms.setdefault(room, set()).add(session)
        if presence:
            self._watching.setdefault(room, set()).add(session)
        else:
            _discard(self._watching, room, session)
        if room not in session.rooms:
            session.rooms.add(room)
            self._count(room, session.identity.user, 1)

    def leave(self, room: str, session: Session) -> None:
        _discard(self._rooms, room, session)
        _discard(self._watching, room, session)
        if room in session.rooms:
            session.rooms.discard(room)
            self._count(room, session.identity.user, -1)
        session.stop_recovering(room)

    def _count(self, room: str, user: str, step: int) -> None:
        n = self._members.get((room, user), 0) + step
        if n > 0:
            self._members[(room, user)] = n
        else:
            self._members.pop((room, user), None)
        if ((n == 1 and step > 0) or n == 0) and self.on_member is not None:
            self.on_member(room, user, n == 1)

    def members(self) -> list[tuple[str, str]]:
        """Every (room, user) with a session here."""
        return list(self._members)

    def drop(self, session: Session) -> None:
        for room in list(session.rooms):
            self.leave(room, session)
        self.sessions.discard(session)
        _discard(self._users, session.identity.user, session)
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

    def room_sessions(self, room: str) -> Set[Session]:
        return self._rooms.get(room) or _NONE

    def watching(self, room: str) -> Set[Session]:
        """Sessions in `room` that asked for its presence events."""
        return self._watching.get(room) or _NONE

    def user_sessions(self, user: str) -> Set[Session]:
        return self._users.get(user) or _NONE

    def rooms(self) -> list[str]:
        return list(self._rooms)

    def has_room(self, room: str) -> bool:
        return room in self._rooms

    def has_room_key(self, key: bytes | None) -> bool:
        """Whether a record with this Kafka key (its room, UTF-8) has a member here."""
        if not key:
            return False
        try:
            return key.decode() in self._rooms
        except UnicodeDecodeError:
            return False

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


_NONE: frozenset[Session] = frozenset()


def _discard(index: dict[str, set[Session]], key: str, session: Session) -> None:
    members = index.get(key)
    if members is not None:
        members.discard(session)
        if not members:
            del index[key]
