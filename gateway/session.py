"""One client connection's outbound side: a bounded queue drained by its own sender task.

Fan-out never awaits a client. A frame is written at once when the sender is idle and the
connection takes it (gateway/wire.py: the client reads, so the transport is not paused); otherwise
it is queued, in order behind what waits. A client whose queue fills is closed with 4008 (resume
with your last cursor) instead of growing memory or slowing the node.

A node holds tens of thousands of mostly idle sessions, so a session keeps only what it uses:
slots, a plain list as the queue (the sender takes it whole), and a wakeup future that exists
only while the sender waits. What only some sessions need (held-back frames of a room being
recovered, a replay waiting for room in the queue) is created when first needed and let go after.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

from gateway import metrics
from gateway.protocol import Close
from gateway.wire import WriteFrame, text_frame
from shared.auth import Identity

TOO_SLOW_REASON = "too slow; resume with your last cursor"
INTERNAL_ERROR = 1011  # (a close code the protocol does not name: writing to the client failed)


class Socket(Protocol):
    """What a session needs of its WebSocket (starlette's WebSocket has it)."""

    async def send_text(self, data: str) -> None: ...

    async def close(self, code: int = 1000, reason: str | None = None) -> None: ...


class Session:
    __slots__ = (
        "_floors",
        "_queue",
        "_queue_max",
        "_recovering",
        "_socket",
        "_space",
        "_taken",
        "_wakeup",
        "_write_now",
        "close_code",
        "close_reason",
        "identity",
        "rooms",
    )

    def __init__(self, identity: Identity, socket: Socket, queue_max: int,
                 write_now: WriteFrame | None = None) -> None:
        self.identity = identity
        self.close_code: int | None = None
        self.close_reason = ""
        self.rooms: set[str] = set()
        self._socket = socket
        self._queue: list[str] = []  # frames the sender has not taken yet, oldest first
        self._taken = 0  # frames the sender has taken from the queue and not yet started to write
        self._queue_max = queue_max
        self._wakeup: asyncio.Future[None] | None = None  # set while the sender waits for frames
        self._space: asyncio.Event | None = None  # set while a replay waits for the queue to drain
        self._recovering: dict[str, list[tuple[int, str]]] | None = None
        self._floors: dict[str, int] | None = None  # room -> the client has every offset up to this
        self._write_now = write_now  # writes a serialised frame to the client at once, if it can

    @property
    def recovering(self) -> dict[str, list[tuple[int, str]]]:
        """room -> live frames held back while that room's missed messages are replayed."""
        if self._recovering is None:
            self._recovering = {}
        return self._recovering

    def skip_through(self, room: str, offset: int) -> None:
        """The client resumed `room` at `offset`, which this node has not fanned out yet (another
        node was ahead): live frames up to it are repeats, not sent."""
        if self._floors is None:
            self._floors = {}
        self._floors[room] = offset

    def stop_recovering(self, room: str) -> None:
        """Forget the frames held back for `room` and its floor (it was left)."""
        if self._floors is not None:
            self._floors.pop(room, None)
        if self._recovering is not None:
            self._recovering.pop(room, None)
            if not self._recovering:
                self._recovering = None

    @property
    def queued(self) -> int:
        return len(self._queue) + self._taken

    def push(self, frame: str, wire: bytes | None = None) -> None:
        """Send a frame to this client (`wire`: the same, serialised), at once when the sender is
        idle (nothing queued or being written that it could overtake), else through the queue.
        Never blocks."""
        if self.close_code is not None:
            return
        wakeup = self._wakeup
        if wakeup is not None and self._write_now is not None and not wakeup.done():
            if self._write_now(wire if wire is not None else text_frame(frame.encode())):
                return
        if len(self._queue) + self._taken >= self._queue_max:
            self._too_slow()
            return
        self._queue.append(frame)
        self._wake_sender()

    async def push_paced(self, frames: list[str]) -> None:
        """Queue many frames (a replay) without tripping the slow-consumer bound: wait for the
        sender whenever the queue is half full. A client too slow for that is closed 4008."""
        half = max(1, self._queue_max // 2)
        for frame in frames:
            while self.queued >= half and self.close_code is None:
                if self._space is None:
                    self._space = asyncio.Event()
                await self._space.wait()
            self.push(frame)

    def deliver(self, room: str, offset: int, frame: str, wire: bytes | None = None) -> None:
        floors = self._floors
        if floors is not None and room in floors:
            if offset <= floors[room]:
                return
            del floors[room]
        recovering = self._recovering
        held = None if recovering is None else recovering.get(room)
        if held is None:
            if recovering is not None and not recovering:  # every replay is over
                self._recovering = None
            self.push(frame, wire)
        elif len(held) >= self._queue_max:
            self._too_slow()
        else:
            held.append((offset, frame))

    def close(self, code: int, reason: str = "") -> None:
        """Close the connection with `code` once the frames being written are out (the sender does)."""
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
            self._wake_sender()
            self._wake_replays()  # (they push nothing more)

    def _too_slow(self) -> None:
        metrics.SLOW_DISCONNECTS.inc()
        self.close(Close.TOO_SLOW, TOO_SLOW_REASON)

    def _wake_sender(self) -> None:
        wakeup, self._wakeup = self._wakeup, None
        if wakeup is not None and not wakeup.done():  # (done: the sender was cancelled)
            wakeup.set_result(None)

    def _wake_replays(self) -> None:
        space, self._space = self._space, None
        if space is not None:
            space.set()

    async def run_sender(self) -> None:
        """Send queued frames until the session is closed; then close the socket. Writing that fails
        (the client is gone, or a bug) closes it too, 1011: the connection's reading ends with it."""
        try:
            while self.close_code is None:
                if not self._queue:
                    self._wakeup = asyncio.get_running_loop().create_future()
                    await self._wakeup
                    continue
                batch, self._queue = self._queue, []  # what comes meanwhile waits for the next round
                self._taken = len(batch)
                for frame in batch:
                    if self.close_code is not None:
                        break
                    self._taken -= 1
                    await self._socket.send_text(frame)
                    if self._space is not None and len(self._queue) + self._taken <= self._queue_max // 2:
                        self._wake_replays()
                self._taken = 0
                del batch, frame  # (not kept while idle)
        except Exception:
            self.close(INTERNAL_ERROR, "internal error")
            await self._close_socket()
            raise
        await self._close_socket()

    async def _close_socket(self) -> None:
        assert self.close_code is not None
        with contextlib.suppress(Exception):  # (the client may be gone already)
            await self._socket.close(self.close_code, self.close_reason)
