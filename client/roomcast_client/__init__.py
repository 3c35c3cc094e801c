"""roomcast's Python client: a WebSocket session that reconnects, resumes its rooms from their
cursors and resends what was not acknowledged. `RoomcastClient` is the way in; README.md has an
example, and the protocol it speaks is docs/protocol.md in the roomcast repository."""

from roomcast_client.client import (
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    AuthError,
    ClientClosed,
    Close,
    ConnectionLost,
    Frame,
    OnFrame,
    OnMessage,
    RoomcastClient,
    RoomcastError,
    apply,
)

__all__ = [
    "MAX_FRAME_BYTES",
    "PROTOCOL_VERSION",
    "AuthError",
    "ClientClosed",
    "Close",
    "ConnectionLost",
    "Frame",
    "OnFrame",
    "OnMessage",
    "RoomcastClient",
    "RoomcastError",
    "apply",
]
