"""Writing a frame to a client at once: uvicorn's WebSocket protocol with one addition.

Through ASGI every outgoing frame takes the session's sender task, Starlette's WebSocket, uvicorn's
`send` and the websockets state machine, and is serialised per client. A server's frames are not
masked, so a message's frame is the same bytes for every member of its room: serialised once per
node (`text_frame`), it can be written to each connection's transport directly. The protocol offers
that as the ASGI scope extension WRITE_FRAME: a callable that writes a serialised frame now and
returns True, or returns False when the frame must take the ordinary path (the handshake is not
done, a close frame went out, or the transport is paused because the client does not read).

A node holds tens of thousands of idle connections, so the protocol also keeps less per connection
than uvicorn's: once the handshake is answered it lets go of the request and response (their
headers stay readable in the scope), and its inbox and writable flag are a list and a bool with a
future only while someone waits, not an asyncio.Queue and Event (three deques and one: ~3 KB).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import State

WRITE_FRAME = "roomcast.write_frame"

WriteFrame = Callable[[bytes], bool]


def text_frame(payload: bytes) -> bytes:
    """One unfragmented, unmasked, uncompressed text frame (the gateway negotiates no extension)."""
    return Frame(Opcode.TEXT, payload).serialize(mask=False, extensions=[])


def write_frame_of(scope: Mapping[str, Any]) -> WriteFrame | None:
    """The connection's direct writer, when its server offers one (uvicorn with PreparedFramesProtocol)."""
    return scope.get("extensions", {}).get(WRITE_FRAME)


class Inbox:
    """What uvicorn's protocol uses of its asyncio.Queue (one reader: the app's `receive`)."""

    __slots__ = ("_getter", "_items")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._getter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        if self._getter is not None and not self._getter.done():
            self._getter.set_result(None)

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items)

    async def get(self) -> Any:
        while not self._items:
            self._getter = asyncio.get_running_loop().create_future()
            try:
                await self._getter
            finally:
                self._getter = None
        return self._items.pop(0)


class Flag:
    """What uvicorn's protocol uses of its asyncio.Event `writable`."""

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = False
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> bool:
        if not self._set:
            waiter = asyncio.get_running_loop().create_future()
            if self._waiters is None:
                self._waiters = []
            self._waiters.append(waiter)
            await waiter
        return True


class PreparedFramesProtocol(WebSocketsSansIOProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = Inbox()  # type: ignore[assignment]
        self.writable = Flag()  # type: ignore[assignment]
        self.writable.set()

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.accept" and self.handshake_complete and self.request is not None:
            # Read only to answer the handshake (the scope keeps the headers). websockets' parser
            # still holds the request, so its headers are emptied rather than only let go.
            self.request.headers.clear()
            self.request = self.response = None  # type: ignore[assignment]

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)  # (none when the handshake was refused)
        if scope is not None:
            scope["extensions"][WRITE_FRAME] = self.write_frame

    def write_frame(self, frame: bytes) -> bool:
        if (not self.handshake_complete or self.close_sent or self.disconnected or not self.writable.is_set()
                or self.conn.state is not State.OPEN or self.transport.is_closing()):
            return False
        self.transport.write(frame)
        return True
