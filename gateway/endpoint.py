"""The `/ws` endpoint: authenticate, then a receiver loop and a sender task per connection."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Coroutine
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from gateway import metrics
from gateway.history import history_frame
from gateway.limits import FRAMES_PER_TURN, MAX_PENDING_REQUESTS, inbound_bucket
from gateway.node import Node, UserState
from gateway.protocol import (
    PONG,
    PROTOCOL_VERSION,
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
    ref_of,
)
from gateway.publisher import Unavailable
from gateway.recovery import resume
from gateway.session import Session
from shared.auth import AuthError, Identity, verify_token
from shared.validation import ROOM_RULE, valid_room

log = logging.getLogger("roomcast.gateway")

CLOSE_WAIT_S = 1.0  # how long a closing connection's sender gets to say why (the close frame)


def origin_allowed(allowed: list[str], origin: str | None) -> bool:
    """Browsers always send Origin on a WebSocket handshake; other clients need not, and are not
    held to it (the token is what authenticates them). An empty list allows every origin."""
    if not allowed or origin is None:
        return True
    return origin.strip().lower() in {o.strip().rstrip("/").lower() for o in allowed}


async def ws_endpoint(websocket: WebSocket) -> None:
    node: Node = websocket.state.node
    s = node.settings
    if not origin_allowed(s.allowed_origins, websocket.headers.get("origin")):
        # Refused during the handshake: uvicorn answers HTTP 403 and the page never gets a socket.
        await websocket.close(Close.BAD_TOKEN, "origin not allowed")
        return
    if websocket.query_params.get("v", PROTOCOL_VERSION) != PROTOCOL_VERSION:
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
    user.connections += 1  # before any await: concurrent handshakes cannot all pass the check
    metrics.CONNECTIONS.inc()
    try:
        await websocket.accept()
        await serve(node, websocket, identity)
    finally:
        user.connections -= 1
        metrics.CONNECTIONS.dec()
        if user.connections == 0:
            forget_user_later(node, identity.user, user)


def forget_user_later(node: Node, user_id: str, state: UserState) -> None:
    """Drop a user's state once nothing distinguishes it from a fresh one: no connection left and
    a full bucket. Until then it is kept, so reconnecting does not refill the bucket."""
    wait = state.bucket.full_in() if state.bucket is not None else 0.0

    def forget() -> None:
        if state.connections == 0 and node.users.get(user_id) is state:
            del node.users[user_id]

    if wait <= 0:
        forget()
    else:
        asyncio.get_running_loop().call_later(wait, forget)


async def serve(node: Node, websocket: WebSocket, identity: Identity) -> None:
    """An accepted connection, until either side closes it."""

    async def send_text(text: str) -> None:
        await websocket.send({"type": "websocket.send", "text": text})

    async def close(code: int, reason: str) -> None:
        with contextlib.suppress(Exception):
            await websocket.close(code, reason)

    session = Session(identity, send_text, close, node.settings.send_queue_max)
    node.hub.sessions.add(session)
    conn = Connection(node, session, websocket)
    expiry: asyncio.TimerHandle | None = None
    if identity.expires_at is not None:  # closes an idle connection too, not just at its next frame
        expiry = asyncio.get_running_loop().call_later(
            max(0.0, identity.expires_at - time.time()), session.close, Close.BAD_TOKEN, "token expired")
    sender = asyncio.create_task(session.run_sender(), name="ws-sender")
    receiver = asyncio.create_task(conn.receive_loop(), name="ws-receiver")
    try:
        await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
        if session.close_code is not None and not sender.done():
            await asyncio.wait({sender}, timeout=CLOSE_WAIT_S)  # it sends the close frame with its code
    finally:
        if expiry is not None:
            expiry.cancel()
        for t in (sender, receiver, *conn.tasks):
            t.cancel()
        for outcome in await asyncio.gather(sender, receiver, return_exceptions=True):
            if isinstance(outcome, Exception) and not isinstance(outcome, WebSocketDisconnect):  # (client gone)
                log.error("connection task crashed", exc_info=outcome)
        node.hub.drop(session)


class Connection:
    """One client's inbound side: each frame is validated, then handled."""

    def __init__(self, node: Node, session: Session, websocket: WebSocket) -> None:
        self.node = node
        self.s = node.settings
        self.session = session
        self.identity: Identity = session.identity
        self.ws = websocket
        self.tasks: set[asyncio.Task[None]] = set()
        self.requests = 0  # join/history tasks running
        self.inbound = inbound_bucket(self.s)
        self.sends: asyncio.Queue[Send] = asyncio.Queue(maxsize=256)
        self.send_worker: asyncio.Task[None] | None = None

    def reply(self, frame: str) -> None:
        self.session.push(frame)

    def fail(self, code: str, reason: str, ref: str | None = None, **extra: object) -> None:
        metrics.ERRORS.labels(code).inc()
        self.reply(error(code, reason, ref, **extra))

    async def receive_loop(self) -> None:
        in_a_row = 0
        while True:
            try:
                msg = await self.ws.receive()
            except WebSocketDisconnect:
                return
            if msg["type"] == "websocket.disconnect":
                return
            if (delay := self.inbound.debit()) > 0:
                await asyncio.sleep(delay)  # over budget: read nothing meanwhile (TCP pushes back)
            if self.identity.expires_at is not None and time.time() >= self.identity.expires_at:
                self.session.close(Close.BAD_TOKEN, "token expired")
                return
            text = msg.get("text")
            if text is None:
                self.fail(Err.BAD_FRAME, "binary frames are not accepted; send JSON text")
            else:
                try:
                    self.handle(parse_frame(text))
                except FrameError as e:
                    self.fail(e.code, e.reason, e.ref)
                except Exception:  # a bug: answer it and keep the connection (and log why)
                    log.exception("frame handler crashed")
                    self.fail(Err.UNAVAILABLE, "internal error")
            # Frames already buffered are read without a pause: let the other connections run.
            in_a_row += 1
            if in_a_row >= FRAMES_PER_TURN:
                in_a_row = 0
                await asyncio.sleep(0)

    def handle(self, frame: object) -> None:
        if isinstance(frame, Send):
            self.on_send(frame)
        elif isinstance(frame, Join):
            self.request(self.on_join(frame), ref_of(frame.room))
        elif isinstance(frame, Leave):
            self.on_leave(frame)
        elif isinstance(frame, History):
            self.request(self.on_history(frame), ref_of(frame.room))
        elif isinstance(frame, Ping):
            self.reply(PONG)

    def request(self, coro: Coroutine[Any, Any, None], room: str | None) -> None:
        """Run a join or history in its own task, at most MAX_PENDING_REQUESTS at once."""
        if self.requests >= MAX_PENDING_REQUESTS:
            coro.close()
            self.fail(Err.RATE_LIMITED, f"more than {MAX_PENDING_REQUESTS} requests in progress", room,
                      retry_after_ms=100)
            return
        self.requests += 1
        task = self.spawn(coro, room)
        task.add_done_callback(self._request_done)

    def _request_done(self, task: asyncio.Task[None]) -> None:
        self.requests -= 1

    def spawn(self, coro: Coroutine[Any, Any, None], ref: str | None) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(functools.partial(self._task_done, ref))
        return task

    def _task_done(self, ref: str | None, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("frame handler crashed", exc_info=task.exception())
            self.fail(Err.UNAVAILABLE, "internal error", ref)

    def check_room(self, room: str, ref: str | None) -> bool:
        if not valid_room(room):
            self.fail(Err.BAD_FRAME, ROOM_RULE, ref_of(ref))
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
            except Exception:  # a bug must not stop this connection's sends for good
                log.exception("send failed")
                self.fail(Err.UNAVAILABLE, "internal error", f.client_msg_id)
                continue
            self.spawn(self._reply_ack(f.client_msg_id, ack), f.client_msg_id)

    async def _reply_ack(self, client_msg_id: str, ack: Awaitable[bytes]) -> None:
        try:
            self.reply((await ack).decode())
        except Unavailable as e:
            self.fail(Err.UNAVAILABLE, str(e), client_msg_id)

    async def on_join(self, f: Join) -> None:
        room = f.room
        if not self.check_room(room, room):
            return
        if room not in self.session.rooms and len(self.session.rooms) >= self.s.max_rooms_per_conn:
            self.fail(Err.LIMIT, f"at most {self.s.max_rooms_per_conn} rooms per connection", room)
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
            self.fail(Err.NOT_JOINED, f"not in room {f.room}"[:100], ref_of(f.room))
            return
        self.node.hub.leave(f.room, self.session)
        self.reply(dumps({"type": "left", "room": f.room}))

    async def on_history(self, f: History) -> None:
        room = f.room
        if not self.check_room(room, room):
            return

        def fail(code: str, reason: str, *_: object, **extra: object) -> None:
            self.fail(code, reason, ref_of(room), **extra)

        frame = await history_frame(self.node, room, f.before, f.limit, fail)
        if frame:
            self.reply(frame)
