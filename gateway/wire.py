"""Writing a frame to a client at once: uvicorn's WebSocket protocol with one addition.

Through ASGI every outgoing frame takes the session's sender task, Starlette's WebSocket, uvicorn's
`send` and the websockets state machine, and is serialised per client. A server's frames are not
masked, so a message's frame is the same bytes for every member of its room: serialised once per
node (`text_frame`), it can be written to each connection's transport directly. The protocol offers
that as the ASGI scope extension WRITE_FRAME: a callable that writes a serialised frame now and
returns True, or returns False when the frame must take the ordinary path (the handshake is not
done, a close frame went out, or the transport is paused because the client does not read).
"""

from __future__ import annotations

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


class PreparedFramesProtocol(WebSocketsSansIOProtocol):
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
