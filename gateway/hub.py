"""Which of this node's sessions are in which room, and handing a message to all of them."""

from __future__ import annotations

from gateway.session import Session


class Hub:
    def __init__(self) -> None:
        self._rooms: dict[str, set[Session]] = {}
        self.sessions: set[Session] = set()

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
        session.recovering.pop(room, None)

    def drop(self, session: Session) -> None:
        for room in list(session.rooms):
            self.leave(room, session)
        self.sessions.discard(session)

    def publish(self, room: str, offset: int, frame: str) -> int:
        """Queue one pre-serialised frame for every member; returns how many got it."""
        members = self._rooms.get(room)
        if not members:
            return 0
        for s in tuple(members):
            s.deliver(room, offset, frame)
        return len(members)

    def has_room(self, room: str) -> bool:
        return room in self._rooms

    @property
    def room_count(self) -> int:
        return len(self._rooms)
