"""The `/ws` endpoint: authenticate, then read frames in the connection's task while a sender task writes."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from aiokafka.errors import KafkaError
from redis.exceptions import RedisError
from starlette.datastructures import Headers, QueryParams
from starlette.types import Scope
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from gateway import metrics
from gateway.changes import change
from gateway.history import history_frame
from gateway.limits import FRAMES_PER_TURN, MAX_PENDING_REQUESTS, MAX_QUEUED_SENDS, TokenBucket, inbound_bucket
from gateway.node import Node
from gateway.protocol import (
    BEARER_PREFIX,
    PONG,
    PROTOCOL_VERSION,
    SUBPROTOCOL,
    Close,
    Delete,
    Edit,
    Err,
    FrameError,
    History,
    Join,
    Leave,
    Ping,
    Presence,
    Read,
    Send,
    Typing,
    Unread,
    dumps,
    error,
    parse_auth,
    parse_frame,
    ref_of,
)
from gateway.publisher import check_send
from gateway.quota import Count, UserState
from gateway.readstate import STORE_ERRORS
from gateway.recovery import resume
from gateway.session import Session
from gateway.wire import write_frame_of
from shared.auth import AuthError, Identity, verify_token
from shared.cursor import CursorError, join_point, parse_cursor
from shared.errors import BadRequest, RoomcastError, Unavailable
from shared.settings import Settings
from shared.validation import ROOM_RULE, valid_room

log = logging.getLogger("roomcast.gateway")

CLOSE_WAIT_S = 1.0  # how long a closing connection's sender gets to say why (the close frame)
TOO_MANY_CONNECTIONS = "too many connections for this user"


def origin_allowed(allowed: list[str], origin: str | None) -> bool:
    """Browsers always send Origin on a WebSocket handshake; other clients need not, and are not
    held to it (the token is what authenticates them). An empty list allows every origin."""
    if not allowed or origin is None:
        return True
    return origin.strip().lower() in {o.strip().rstrip("/").lower() for o in allowed}


class Refused(Exception):
    """The handshake is refused: closed with this code and reason."""

    def __init__(self, reason: str, code: int = Close.BAD_TOKEN) -> None:
        super().__init__(reason)
        self.code = code


@dataclass(frozen=True, slots=True)
class Handshake:
    subprotocol: str | None  # to select (echoed in the answer), never the one carrying the token
    token: str | None  # None: the token comes in the first frame


def handshake_of(scope: Scope) -> Handshake:
    """What a connecting client offered: the protocol version (`v` in the query, or the
    subprotocol `roomcast.v1`) and where its token is (the subprotocol `bearer.<JWT>`, else the
    query's `token`, else none: the first frame), or Refused."""
    query = QueryParams(scope["query_string"])  # (parsed here: the connection does not keep it)
    offered = scope.get("subprotocols") or []
    selected = SUBPROTOCOL if SUBPROTOCOL in offered else None
    version = query.get("v")
    if version is None and selected is None:  # required: a later version must never be mistaken for this one
        raise Refused(f"protocol version missing: connect with ?v={PROTOCOL_VERSION} or the subprotocol {SUBPROTOCOL}")
    if version not in (None, PROTOCOL_VERSION):
        raise Refused(f"unsupported protocol version: this server speaks v={PROTOCOL_VERSION}")
    bearer = [p.removeprefix(BEARER_PREFIX) for p in offered if p.startswith(BEARER_PREFIX)]
    if bearer and selected is None:
        raise Refused(f"a token in the subprotocols needs the subprotocol {SUBPROTOCOL} offered too")
    return Handshake(selected, bearer[0] if bearer else query.get("token"))


def identity_of(settings: Settings, token: str | None) -> Identity:
    try:
        return verify_token(settings, token)
    except AuthError as e:
        raise Refused(f"bad token: {e}"[:120]) from None


async def authenticate(node: Node, websocket: WebSocket, offer: Handshake) -> Identity | None:
    """The client's identity, from its handshake or else its first frame (within AUTH_TIMEOUT_S;
    at most MAX_UNAUTHENTICATED connections wait for theirs at once), or Refused. None: it left."""
    s = node.settings
    if offer.token is not None:
        return identity_of(s, offer.token)
    if node.unauthenticated >= s.max_unauthenticated:
        raise Refused("too many connections waiting to authenticate; try again later", Close.TRY_AGAIN_LATER)
    node.unauthenticated += 1
    metrics.UNAUTHENTICATED.inc()
    try:
        await websocket.accept(offer.subprotocol)
        try:
            msg = await asyncio.wait_for(websocket.receive(), s.auth_timeout_s)
        except TimeoutError:
            raise Refused(f"no auth frame within {s.auth_timeout_s:g} s") from None
    finally:
        node.unauthenticated -= 1
        metrics.UNAUTHENTICATED.dec()
    if msg["type"] == "websocket.disconnect":
        return None
    try:
        return identity_of(s, parse_auth(msg.get("text")))
    except FrameError as e:
        raise Refused(e.reason) from None


async def refuse(websocket: WebSocket, offer: Handshake | None, code: int, reason: str) -> None:
    """Close with a code the client can read: after the handshake (before it, uvicorn answers 403)."""
    if websocket.application_state is WebSocketState.CONNECTING:
        await websocket.accept(offer.subprotocol if offer is not None else None)
    await websocket.close(code, reason)


async def ws_endpoint(websocket: WebSocket) -> None:
    # The node, the origin and the query come straight from the scope: starlette's `state`,
    # `headers` and `query_params` would keep a parsed copy for the life of the connection.
    node: Node = websocket.scope["state"]["node"]
    s = node.settings
    if not origin_allowed(s.allowed_origins, Headers(scope=websocket.scope).get("origin")):
        # Refused during the handshake: uvicorn answers HTTP 403 and the page never gets a socket.
        await websocket.close(Close.BAD_TOKEN, "origin not allowed")
        return
    offer = None
    try:
        offer = handshake_of(websocket.scope)
        identity = await authenticate(node, websocket, offer)
    except Refused as e:
        await refuse(websocket, offer, e.code, str(e))
        return
    if identity is None:
        return
    user = node.user(identity.user)
    if user.connections >= s.max_conns_per_user:
        await refuse(websocket, offer, Close.TRY_AGAIN_LATER, TOO_MANY_CONNECTIONS)
        return
    user.connections += 1  # before any await: concurrent handshakes cannot all pass the check
    user.until = max(user.until, identity.expires_at or 0.0)
    metrics.CONNECTIONS.inc()
    count = None
    try:
        count = await node.quota.connect(identity.user, identity.expires_at)
        if count is Count.REFUSED:
            await refuse(websocket, offer, Close.TRY_AGAIN_LATER, TOO_MANY_CONNECTIONS)
            return
        if websocket.application_state is WebSocketState.CONNECTING:
            await websocket.accept(offer.subprotocol)
        await Connection(node, websocket, identity, user).serve()
    finally:
        user.connections -= 1
        metrics.CONNECTIONS.dec()
        if count is not None and count is not Count.REFUSED:
            node.quota.disconnected(identity.user, count)
        if user.connections == 0 and node.users.get(identity.user) is user:
            del node.users[identity.user]  # (its send budget lives in Redis)


class Connection:
    """One client connection: its frames are read and handled in the connection's own task; what
    goes out is written by its session's sender task (fan-out never waits for a client).

    Per idle connection that is all: this object, its session, the sender waiting for frames (the
    token's expiry is the hub's timer). The rest exists only while in use: the set of running tasks
    (join/history requests, the send worker, acks not received yet) and the queue of sends waiting
    for the producer, with the worker that hands them over in order."""

    __slots__ = ("_joining", "_replay_budget", "_resume_turn", "_resumes", "_sends", "_tasks", "identity", "inbound",
                 "node", "requests", "s", "session", "user", "ws")

    def __init__(self, node: Node, websocket: WebSocket, identity: Identity, user: UserState) -> None:
        self.node = node
        self.s = node.settings
        self.session = Session(identity, websocket, node.settings.send_queue_max, write_frame_of(websocket.scope))
        self.identity = identity
        self.user = user
        self.ws = websocket
        self.inbound = inbound_bucket(self.s)
        self.requests = 0  # join/history tasks running
        self._tasks: set[asyncio.Future[Any]] | None = None
        self._sends: deque[tuple[Send | Edit | Delete, bool]] | None = None  # while the send worker runs
        self._joining: set[str] | None = None  # rooms with a join in progress
        # Resumes run one at a time, each charged the entries it read (see on_join).
        self._resumes = 0  # waiting or running
        self._resume_turn: asyncio.Lock | None = None  # while any
        self._replay_budget: TokenBucket | None = None  # from the first resume on

    async def serve(self) -> None:
        """Until either side closes the connection. (The receive loop is here, not in a task or a
        coroutine of its own: each costs memory for as long as the connection is idle.)"""
        session = self.session
        self.node.hub.add(session)
        sender = asyncio.create_task(session.run_sender(), name="ws-sender")
        try:
            in_a_row = 0
            while True:
                try:
                    msg = await self.ws.receive()
                except WebSocketDisconnect:
                    break
                if msg["type"] == "websocket.disconnect":  # (also once a close frame we sent is out)
                    break
                if (delay := self.inbound.debit()) > 0:
                    await asyncio.sleep(delay)  # over budget: read nothing meanwhile (TCP pushes back)
                if self.identity.expires_at is not None and time.time() >= self.identity.expires_at:
                    session.close(Close.BAD_TOKEN, "token expired")
                    break
                self.on_frame(msg.get("text"))
                # Frames already buffered are read without a pause: let the other connections run.
                in_a_row += 1
                if in_a_row >= FRAMES_PER_TURN:
                    in_a_row = 0
                    await asyncio.sleep(0)
            if session.close_code is not None and not sender.done():
                await asyncio.wait({sender}, timeout=CLOSE_WAIT_S)  # it sends the close frame with its code
        except Exception:
            log.exception("connection task crashed")
        finally:
            sender.cancel()
            self.cancel_tasks()
            self.node.hub.drop(session)
            outcome = (await asyncio.gather(sender, return_exceptions=True))[0]
            if isinstance(outcome, Exception) and not isinstance(outcome, WebSocketDisconnect):  # (client gone)
                log.error("connection task crashed", exc_info=outcome)

    def reply(self, frame: str) -> None:
        self.session.push(frame)

    def fail(self, code: str, reason: str, ref: str | None = None, **extra: object) -> None:
        metrics.ERRORS.labels(code).inc()
        self.reply(error(code, reason, ref, **extra))

    def on_frame(self, text: str | None) -> None:
        if text is None:
            self.fail(Err.BAD_FRAME, "binary frames are not accepted; send JSON text")
            return
        try:
            self.handle(parse_frame(text))
        except FrameError as e:
            self.fail(e.code, e.reason, e.ref)
        except Exception:  # a bug: answer it and keep the connection (and log why)
            log.exception("frame handler crashed")
            self.fail(Err.UNAVAILABLE, "internal error")

    def handle(self, frame: object) -> None:
        if isinstance(frame, Send | Edit | Delete):
            self.on_send(frame)
        elif isinstance(frame, Join):
            self.request(self.on_join(frame), ref_of(frame.room))
        elif isinstance(frame, Leave):
            self.on_leave(frame)
        elif isinstance(frame, History):
            self.request(self.on_history(frame), ref_of(frame.room))
        elif isinstance(frame, Ping):
            self.reply(PONG)
        elif isinstance(frame, Typing):
            self.on_typing(frame)
        elif isinstance(frame, Read):
            if self.check_room(frame.room, frame.room):
                self.request(self.on_read(frame), ref_of(frame.room))
        elif isinstance(frame, Presence):
            if self.check_room(frame.room, frame.room):
                self.request(self.on_presence(frame), ref_of(frame.room))
        elif isinstance(frame, Unread):
            self.request(self.on_unread(), None)

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
        self._track(task)
        task.add_done_callback(functools.partial(self._task_done, ref))
        return task

    def _track(self, task: asyncio.Future[Any]) -> None:
        if self._tasks is None:
            self._tasks = set()
        self._tasks.add(task)

    def _untrack(self, task: asyncio.Future[Any]) -> None:
        if self._tasks is not None:
            self._tasks.discard(task)
            if not self._tasks:
                self._tasks = None

    def cancel_tasks(self) -> None:
        """The connection ended: stop its requests, its send worker and its pending acks."""
        for task in self._tasks or ():
            task.cancel()

    def _task_done(self, ref: str | None, task: asyncio.Task[None]) -> None:
        self._untrack(task)
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

    async def charge(self, ref: str | None) -> bool:
        """Typing and read frames take from the user's send budget, held across gateways (gateway/quota.py)."""
        try:
            wait = await self.node.quota.take(self.identity.user, self.user)
        except Unavailable as e:
            self.fail(Err.UNAVAILABLE, str(e), ref)
            return False
        if wait > 0:
            self.fail(Err.RATE_LIMITED, "sending too fast", ref, retry_after_ms=int(wait * 1000) + 1)
            return False
        return True

    # --- frames
    def on_send(self, f: Send | Edit | Delete) -> None:
        """A send, edit or delete: checked, then queued for the send worker (they reach Kafka in the
        order the client sent them)."""
        try:
            check_send(self.s, self.identity, f.room, "" if isinstance(f, Delete) else f.body)
        except BadRequest as e:
            self.fail(e.code, e.reason, ref_of(f.client_msg_id))
            return
        sends = self._sends
        if sends is not None and len(sends) >= MAX_QUEUED_SENDS:
            self.fail(Err.RATE_LIMITED, "too many sends awaiting their ack", f.client_msg_id, retry_after_ms=100)
            return
        wait = self.node.quota.admit(self.identity.user, self.user)
        if wait:  # (None: not known here; the send worker asks Redis)
            self.rate_limited(f.client_msg_id, wait)
            return
        if sends is None:  # no worker running: start one
            sends = self._sends = deque()
            self.spawn(self._send_in_order(sends), None)
        sends.append((f, wait is not None))

    async def _send_in_order(self, sends: deque[tuple[Send | Edit | Delete, bool]]) -> None:
        """Sends reach Kafka in the order the client sent them; acks are awaited concurrently (each
        is answered by a callback). Runs while sends are queued; the next send starts a new worker.
        A send not admitted on arrival (bool False) waits here for the user's budget."""
        try:
            while sends:
                f, admitted = sends.popleft()
                try:
                    if not admitted and (wait := await self.node.quota.take_send(self.identity.user, self.user)):
                        self.rate_limited(f.client_msg_id, wait)
                        continue
                    if isinstance(f, Send):
                        ack = await self.node.publisher.send(self.identity.user, f.room, f.client_msg_id, f.body)
                    else:
                        ack = await change(self.node, self.identity, f)
                except RoomcastError as e:
                    self.fail(e.code, e.reason, f.client_msg_id)
                    continue
                except Exception:  # a bug must not stop this connection's sends for good
                    log.exception("send failed")
                    self.fail(Err.UNAVAILABLE, "internal error", f.client_msg_id)
                    continue
                pending = asyncio.ensure_future(ack)
                self._track(pending)
                pending.add_done_callback(functools.partial(self._reply_ack, f.client_msg_id))
        finally:
            self._sends = None
            if waiting := sum(not admitted for _, admitted in sends):  # (the connection ended)
                self.node.quota.forgo(self.user, waiting)

    def rate_limited(self, client_msg_id: str, wait: float) -> None:
        self.fail(Err.RATE_LIMITED, "sending too fast", client_msg_id, retry_after_ms=int(wait * 1000) + 1)

    def _reply_ack(self, client_msg_id: str, ack: asyncio.Future[bytes]) -> None:
        self._untrack(ack)
        if ack.cancelled():  # the connection ended
            return
        e = ack.exception()
        if e is None:
            self.reply(ack.result().decode())
        elif isinstance(e, Unavailable):
            self.fail(Err.UNAVAILABLE, str(e), client_msg_id)
        else:
            log.error("frame handler crashed", exc_info=e)
            self.fail(Err.UNAVAILABLE, "internal error", client_msg_id)

    async def on_join(self, f: Join) -> None:
        room = f.room
        if not self.check_room(room, room):
            return
        if room not in self.session.rooms and len(self.session.rooms) >= self.s.max_rooms_per_conn:
            self.fail(Err.LIMIT, f"at most {self.s.max_rooms_per_conn} rooms per connection", room)
            return
        partition = self.node.keys.partition(room)
        read_state = await self.node.reads.room_state(self.identity.user, room)
        if f.cursor:
            # A client re-sends a join left unanswered (a resume can wait seconds for storage or the
            # log): the join in progress answers it. Two at once would each hold and replay the
            # room's live frames, and one failing would leave the room the other had joined.
            if self._joining is not None and room in self._joining:
                return
            self._joining = (self._joining or set()) | {room}
            try:
                await self._resume(room, f.cursor, f.presence, read_state)
            finally:
                self._joining.discard(room)
                if not self._joining:
                    self._joining = None
            return
        self.node.hub.join(room, self.session, f.presence)
        metrics.JOINS.inc()
        cursor = join_point(partition, self.node.fanout.position(partition))
        self.reply(dumps({"type": "joined", "room": room, "cursor": cursor, **read_state}))

    async def _resume(self, room: str, cursor: str, presence: bool, read_state: dict[str, Any]) -> None:
        """One resume at a time (a connection joining many rooms from cursor 0-0 reads one room's
        history at a time), and all of them held to a budget of entries read (RESUME_BUDGET, refilled
        at RESUME_BUDGET_PER_S): a resume starts only while the budget is not overdrawn, else it is
        answered `rate_limited` with the wait. So what one connection makes the node read is at most
        the budget, its refill, and one resume's worth (RESUME_MAX_MESSAGES, or the log's range)."""
        self._resumes += 1
        turn = self._resume_turn = self._resume_turn or asyncio.Lock()
        try:
            async with turn:
                budget = self._replay_budget
                if budget is None:
                    budget = self._replay_budget = TokenBucket(self.s.resume_budget_per_s, self.s.resume_budget)
                if (wait := budget.debit(0)) > 0:
                    self.fail(Err.RATE_LIMITED, "resuming too much history; join again later", room,
                              retry_after_ms=int(wait * 1000) + 1)
                    return
                metrics.RESUMES_RUNNING.inc()
                try:
                    budget.debit(await resume(self.node, self.session, room, cursor, self.fail, presence, read_state))
                finally:
                    metrics.RESUMES_RUNNING.dec()
        finally:
            self._resumes -= 1
            if not self._resumes:
                self._resume_turn = None

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

    def on_typing(self, f: Typing) -> None:
        if not self.check_room(f.room, f.room):
            return
        if f.room not in self.session.rooms:
            self.fail(Err.NOT_JOINED, f"not in room {f.room}: join it before typing", ref_of(f.room))
            return
        self.spawn(self._typing(f.room), f.room)

    async def _typing(self, room: str) -> None:
        """Forward unless this or another gateway forwarded this user's typing in the room within the interval."""
        if not await self.charge(room):
            return
        if not self.node.typing.allow(self.identity.user, room):
            metrics.TYPING_DROPPED.inc()
            return
        key = self.node.keys.typing(room, self.identity.user)
        try:
            first = await self.node.redis.set(key, 1, nx=True, px=int(self.s.typing_interval_s * 1000))
        except (RedisError, OSError):
            first = True  # this node's own throttle holds meanwhile
        if first:
            self.node.signals.publish(room, {"k": "typing", "user": self.identity.user})
        else:
            metrics.TYPING_DROPPED.inc()

    async def on_read(self, f: Read) -> None:
        room = f.room
        if not await self.charge(room):
            return
        offset = await self._offset_in(room, f.cursor)
        if offset is None:
            self.fail(Err.BAD_CURSOR, f"bad cursor for room {room}: use the cursor of a message of the room"[:120],
                      ref_of(room))
            return
        try:
            stored = await self.node.reads.read(self.identity.user, room, offset,
                                                self.node.signals.conn_id(self.session))
        except (BadRequest, Unavailable) as e:
            self.fail(e.code, e.reason, ref_of(room))
            return
        self.reply(dumps({"type": "read", "room": room, "user": self.identity.user,
                          "cursor": self.node.reads.cursor(room, stored)}))

    async def _offset_in(self, room: str, cursor: str) -> int | None:
        """The offset of `cursor` when it is a position of `room` up to its newest message, else None."""
        partition = self.node.keys.partition(room)
        try:
            at = parse_cursor(cursor)
        except CursorError:
            return None
        if at is None or at.partition != partition:
            return None
        if at.offset < self.node.fanout.end(partition):
            return at.offset
        try:  # a record this node has not consumed yet (the client heard of it elsewhere)?
            return at.offset if at.offset < await self.node.fanout.broker_end(partition) else None
        except KafkaError:
            return None

    async def on_presence(self, f: Presence) -> None:
        try:
            users, count = await self.node.presence.query(f.room)
        except (RedisError, OSError):
            self.fail(Err.UNAVAILABLE, "presence store unavailable", ref_of(f.room))
            return
        self.reply(dumps({"type": "presence", "room": f.room, "users": users, "count": count}))

    async def on_unread(self) -> None:
        try:
            rooms = await self.node.reads.unread(self.identity.user)
        except STORE_ERRORS:
            self.fail(Err.UNAVAILABLE, "read state unavailable")
            return
        self.reply(dumps({"type": "unread", "rooms": rooms}))
