"""The `/ws` endpoint: authenticate, then a receiver loop and a sender task per connection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable

from starlette.websockets import WebSocket, WebSocketDisconnect

from gateway import metrics
from gateway.history import history_frame
from gateway.node import Node
from gateway.protocol import (
    PONG,
    Close,
    Err,
    FrameError,
    History,
    Join,
    Leave,
    Ping,
    Send,
    dumps,
    error,
    parse_frame,
)
from gateway.publisher import Unavailable
from gateway.recovery import resume
from gateway.session import Session
from shared.auth import AuthError, Identity, verify_token
from shared.validation import valid_room

log = logging.getLogger("roomcast.gateway")


async def ws_endpoint(websocket: WebSocket) -> None:
    node: Node = websocket.state.node
    s = node.settings
    origin = websocket.headers.get("origin")
    if s.allowed_origins and origin is not None and origin not in s.allowed_origins:
        await websocket.close(Close.BAD_TOKEN, "origin not allowed")
        return
    if websocket.query_params.get("v", "1") != "1":
        await websocket.accept()
        await websocket.close(Close.BAD_TOKEN, "unsupported protocol version")
        return
    try:
        identity = verify_token(s, websocket.query_params.get("token"))
    except AuthError as e:
        await websocket.accept()
        await websocket.close(Close.BAD_TOKEN, f"bad token: {e}"[:120])
        return
    user = node.user(identity.user)
    if user.connections >= s.max_conns_per_user:
        await websocket.accept()
        await websocket.close(Close.BAD_TOKEN, "too many connections for this user")
        return
    await websocket.accept()
    user.connections += 1
    metrics.CONNECTIONS.inc()

    async def send_text(text: str) -> None:
        await websocket.send({"type": "websocket.send", "text": text})

    async def close(code: int, reason: str) -> None:
        with contextlib.suppress(Exception):
            await websocket.close(code, reason)

    session = Session(identity, send_text, close, s.send_queue_max)
    node.hub.sessions.add(session)
    conn = Connection(node, session, websocket)
    sender = asyncio.create_task(session.run_sender(), name="ws-sender")
    receiver = asyncio.create_task(conn.receive_loop(), name="ws-receiver")
    try:
        await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (sender, receiver, *conn.tasks):
            t.cancel()
        await asyncio.gather(sender, receiver, return_exceptions=True)
        node.hub.drop(session)
        user.connections -= 1
        if user.connections == 0 and user.bucket is not None and user.bucket.tokens >= user.bucket.burst:
            node.users.pop(identity.user, None)
        metrics.CONNECTIONS.dec()


class Connection:
    """One client's inbound side: each frame is validated, then handled."""

    def __init__(self, node: Node, session: Session, websocket: WebSocket) -> None:
        self.node = node
        self.s = node.settings
        self.session = session
        self.identity: Identity = session.identity
        self.ws = websocket
        self.tasks: set[asyncio.Task[None]] = set()
        self.sends: asyncio.Queue[Send] = asyncio.Queue(maxsize=256)
        self.send_worker: asyncio.Task[None] | None = None

    def reply(self, frame: str) -> None:
        self.session.push(frame)

    def fail(self, code: str, reason: str, ref: str | None = None, **extra: object) -> None:
        metrics.ERRORS.labels(code).inc()
        self.reply(error(code, reason, ref, **extra))

    async def receive_loop(self) -> None:
        while True:
            try:
                msg = await self.ws.receive()
            except WebSocketDisconnect:
                return
            if msg["type"] == "websocket.disconnect":
                return
            text = msg.get("text")
            if text is None:
                self.fail(Err.BAD_FRAME, "binary frames are not accepted; send JSON text")
                continue
            if self.identity.expires_at is not None and time.time() >= self.identity.expires_at:
                self.session.close(Close.BAD_TOKEN, "token expired")
                return
            try:
                frame = parse_frame(text)
                self.handle(frame)
            except FrameError as e:
                self.fail(e.code, e.reason, e.ref)

    def handle(self, frame: object) -> None:
        if isinstance(frame, Send):
            self.on_send(frame)
        elif isinstance(frame, Join):
            self.spawn(self.on_join(frame))
        elif isinstance(frame, Leave):
            self.on_leave(frame)
        elif isinstance(frame, History):
            self.spawn(self.on_history(frame))
        elif isinstance(frame, Ping):
            self.reply(PONG)

    def spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)  # type: ignore[arg-type]
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("frame handler crashed", exc_info=task.exception())
            self.fail(Err.UNAVAILABLE, "internal error")

    def check_room(self, room: str, ref: str | None = None) -> bool:
        if not valid_room(room):
            self.fail(Err.BAD_FRAME, "room: 1-64 characters of A-Z a-z 0-9 _ . -", ref)
            return False
        if not self.identity.may_access(room):
            self.fail(Err.FORBIDDEN, f"no access to room {room}", ref)
            return False
        return True

    # --- frames
    def on_send(self, f: Send) -> None:
        if not self.check_room(f.room, f.client_msg_id):
            return
        if len(f.body) > self.s.max_body_chars:
            self.fail(Err.TOO_LARGE, f"body longer than {self.s.max_body_chars} characters", f.client_msg_id)
            return
        bucket = self.node.user(self.identity.user).bucket
        wait = bucket.take() if bucket is not None else 0.0
        if wait > 0:
            self.fail(Err.RATE_LIMITED, "sending too fast", f.client_msg_id, retry_after_ms=int(wait * 1000) + 1)
            return
        if self.sends.full():
            self.fail(Err.RATE_LIMITED, "too many sends awaiting their ack", f.client_msg_id, retry_after_ms=100)
            return
        self.sends.put_nowait(f)
        if self.send_worker is None:
            self.send_worker = asyncio.create_task(self._send_in_order(), name="ws-sends")
            self.tasks.add(self.send_worker)

    async def _send_in_order(self) -> None:
        """Sends reach Kafka in the order the client sent them; acks are awaited concurrently."""
        while True:
            f = await self.sends.get()
            try:
                ack = await self.node.publisher.send(self.identity.user, f.room, f.client_msg_id, f.body)
            except Unavailable as e:
                self.fail(Err.UNAVAILABLE, str(e), f.client_msg_id)
                continue
            self.spawn(self._reply_ack(f.client_msg_id, ack))

    async def _reply_ack(self, client_msg_id: str, ack: Awaitable[dict[str, object]]) -> None:
        try:
            self.reply(dumps(await ack))
        except Unavailable as e:
            self.fail(Err.UNAVAILABLE, str(e), client_msg_id)

    async def on_join(self, f: Join) -> None:
        if not self.check_room(f.room):
            return
        room = f.room
        if room not in self.session.rooms and len(self.session.rooms) >= self.s.max_rooms_per_conn:
            self.fail(Err.LIMIT, f"at most {self.s.max_rooms_per_conn} rooms per connection")
            return
        partition = self.node.keys.partition(room)
        if f.cursor:
            await resume(self.node, self.session, room, f.cursor, self.fail)
            return
        self.node.hub.join(room, self.session)
        metrics.JOINS.inc()
        position = self.node.fanout.position(partition)
        self.reply(dumps({"type": "joined", "room": room, "cursor": f"{partition}-{position - 1}"}))

    def on_leave(self, f: Leave) -> None:
        if f.room not in self.session.rooms:
            self.fail(Err.NOT_JOINED, f"not in room {f.room}"[:100])
            return
        self.node.hub.leave(f.room, self.session)
        self.reply(dumps({"type": "left", "room": f.room}))

    async def on_history(self, f: History) -> None:
        if not self.check_room(f.room):
            return
        frame = await history_frame(self.node, f.room, f.before, f.limit, self.fail)
        if frame:
            self.reply(frame)
