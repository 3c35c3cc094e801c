"""One client connection's outbound side: a bounded queue drained by its own sender task.

Fan-out only appends to the queue and never awaits a client; a client whose queue fills is
closed with 4008 (resume with your last cursor) instead of growing memory or slowing the node.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

from gateway import metrics
from gateway.protocol import Close
from shared.auth import Identity


class Session:
    def __init__(
        self,
        identity: Identity,
        send_text: Callable[[str], Awaitable[None]],
        close: Callable[[int, str], Awaitable[None]],
        queue_max: int,
    ) -> None:
        self.identity = identity
        self._send_text = send_text
        self._close = close
        self._queue: deque[str] = deque()
        self._queue_max = queue_max
        self._wakeup = asyncio.Event()
        self._space = asyncio.Event()  # set while the queue is at most half full
        self.close_code: int | None = None
        self.close_reason = ""
        self.rooms: set[str] = set()
        # room -> live frames held back while that room's missed messages are replayed
        self.recovering: dict[str, list[tuple[int, str]]] = {}

    def push(self, frame: str) -> None:
        """Queue a frame for this client; never blocks."""
        if self.close_code is not None:
            return
        if len(self._queue) >= self._queue_max:
            metrics.SLOW_DISCONNECTS.inc()
            self.close(Close.TOO_SLOW, "too slow; resume with your last cursor")
            return
        self._queue.append(frame)
        self._wakeup.set()

    async def push_paced(self, frames: list[str]) -> None:
        """Queue many frames (a replay) without tripping the slow-consumer bound: wait for the
        sender whenever the queue is half full. A client too slow for that is closed 4008."""
        half = max(1, self._queue_max // 2)
        for frame in frames:
            while len(self._queue) >= half and self.close_code is None:
                self._space.clear()
                await self._space.wait()
            self.push(frame)

    def deliver(self, room: str, offset: int, frame: str) -> None:
        held = self.recovering.get(room)
        if held is None:
            self.push(frame)
        elif len(held) >= self._queue_max:
            metrics.SLOW_DISCONNECTS.inc()
            self.close(Close.TOO_SLOW, "too slow; resume with your last cursor")
        else:
            held.append((offset, frame))

    def close(self, code: int, reason: str = "") -> None:
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
            self._wakeup.set()

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def run_sender(self) -> None:
        """Send queued frames until the session is closed; then close the socket."""
        queue = self._queue
        while True:
            while queue and self.close_code is None:
                await self._send_text(queue.popleft())
                if len(queue) <= self._queue_max // 2:
                    self._space.set()
            if self.close_code is not None:
                self._space.set()
                await self._close(self.close_code, self.close_reason)
                return
            self._wakeup.clear()
            await self._wakeup.wait()
