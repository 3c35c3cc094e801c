"""The roomcast Python client: one WebSocket session that outlives the gateway it is connected to.

On a lost connection it reconnects (full-jitter back-off, URLs in rotation), re-joins every room
with the last cursor it received (the server replays what was missed) and resends every un-acked
send with the same client_msg_id (the server acknowledges a repeat without storing it twice).
A replay may overlap live delivery, so messages are dropped by id and by cursor. What it does on
each close code is the protocol reference's advice (docs/protocol.md in the roomcast repository).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import inspect
import logging
import random
import re
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Literal
from urllib.parse import quote

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.typing import Subprotocol

log = logging.getLogger("roomcast.client")

Frame = dict[str, Any]
OnMessage = Callable[[Frame], Awaitable[None] | None]
OnSignal = Callable[[Frame], Awaitable[None] | None]
OnFrame = Callable[[Frame], None]

TYPING_INTERVAL_S = 3.0  # the server forwards at most one typing signal per user and room this often

PROTOCOL_VERSION = "1"
MAX_FRAME_BYTES = 64 * 1024  # the server's default limit; a larger frame gets the connection closed 1009
# What the server may send in one frame: a history page of 200 messages of 4,000 characters each
# can pass websockets' default of 1 MiB (then the client would close the connection, 1009).
MAX_RECEIVED_BYTES = 16 * 1024 * 1024


class Close(IntEnum):
    """The server's close codes, and what the client does on each."""

    BAD_TOKEN = 1008  # refused (token, protocol version): AuthError; a token callable gets one more try
    TOO_LARGE = 1009  # a frame over the server's limit (never sent: checked against max_frame_bytes first)
    DRAINING = 1012  # the node is going away: reconnect at once (the next URL) and resume
    TRY_AGAIN_LATER = 1013  # too many connections for this user: reconnect with a growing back-off
    TOO_SLOW = 4008  # this client fell behind: reconnect at once and resume


RESUME_SOON = frozenset({Close.DRAINING, Close.TOO_SLOW})  # the server asks us to come back: no growing back-off
# The token travels in the Sec-WebSocket-Protocol header by default (out of the URL, which proxies
# log): the subprotocol the server selects, and the token as `bearer.<JWT>` (never echoed).
SUBPROTOCOL, BEARER_PREFIX = "roomcast.v1", "bearer."
TokenIn = Literal["header", "frame", "query"]
HEADER_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,4096}")  # an HTTP token (a JWT is one) of a header's size
RETRIABLE = frozenset({"unavailable", "rate_limited", "connection_lost"})


class RoomcastError(Exception):
    """An `error` frame from the server, or a failure of the client itself."""

    def __init__(self, code: str, reason: str = "", frame: Frame | None = None) -> None:
        super().__init__(f"{code}: {reason}" if reason else code)
        self.code, self.reason, self.frame = code, reason, frame or {}
        self.retriable = code in RETRIABLE


class AuthError(RoomcastError):
    """The server refused the connection (close 1008: the token, or the protocol version; HTTP
    401/403): retrying will not help."""

    def __init__(self, reason: str = "") -> None:
        super().__init__("auth", reason)


class ConnectionLost(RoomcastError):
    def __init__(self, reason: str = "") -> None:
        super().__init__("connection_lost", reason)


class ClientClosed(RoomcastError):
    def __init__(self) -> None:
        super().__init__("closed", "the client was closed")


def _offset(cursor: object) -> int | None:
    """The offset of a 'partition-offset' cursor, or None; lenient, since cursors are the server's."""
    if not isinstance(cursor, str):
        return None
    _, sep, off = cursor.partition("-")
    try:
        return int(off) if sep else None
    except ValueError:
        return None


@dataclass
class _Room:
    window: int
    cursor: str = ""  # last cursor received; "" = none yet
    confirmed: int = 0  # the connection whose `joined` frame we last got (0: never joined)
    presence: bool = False  # joined with presence events
    typed: float = -TYPING_INTERVAL_S  # when a typing frame was last sent (monotonic)
    refused: int = 0  # re-joins refused in a row (their back-off)
    retry: asyncio.TimerHandle | None = None  # the next re-join after a refusal
    _order: deque[str] = field(default_factory=deque)
    _ids: set[str] = field(default_factory=set)

    def set_cursor(self, cursor: object) -> None:
        if isinstance(cursor, str) and cursor:  # (opaque: e.g. "3-start", an empty partition's join point)
            self.cursor = cursor

    def accept(self, msg_id: str, cursor: str) -> bool:
        """False for a repeat: an id seen recently, or a position at or before the last one."""
        offset, last = _offset(cursor), _offset(self.cursor)
        if msg_id in self._ids or (offset is not None and last is not None and offset <= last):
            return False
        if len(self._order) >= self.window:
            self._ids.discard(self._order.popleft())
        self._order.append(msg_id)
        self._ids.add(msg_id)
        self.set_cursor(cursor)
        return True


@dataclass
class _Send:
    cmid: str
    frame: str
    future: asyncio.Future[Frame]
    gen: int = 0  # the connection it was last written on (0: not yet written)
    attempts: int = 0  # `unavailable` answers so far
    timer: asyncio.TimerHandle | None = None


class RoomcastClient:
    """`async with RoomcastClient(urls, token) as c:` then join/send/history, and read messages with
    `async for m in c.messages()` or `on_message=` (sync or async). Without on_message, unread
    messages queue up to max_queue, then the client stops reading (acks too) until you catch up.

    Edits and deletes: `edit(room, id, body)`, `delete(room, id)`; the `edit` and `delete` frames of
    the rooms come through messages() / on_message in the room's order with the `message` frames
    (their `type` says which); `apply(messages, frame)` keeps a dict of a room's messages current.

    Presence, typing and read state: `join(room, presence=True)` then `presence(room)` and
    `on_presence=` for each `presence_event`; `typing(room)` (throttled here as the server does) and
    `on_typing=`; `read(room, cursor)` and `on_read=` for the user's marks from other devices and
    other users' receipts; `unread()`. Signals are not replayed after a reconnect: ask again.

    `on_frame=` (sync) sees every frame the server sends, as it arrives, before the client acts on
    it: repeats and replays the client drops, acks, errors and `joined` frames too (for tracing,
    and for tests that hold the server to the protocol below the client's own filtering)."""

    def __init__(
        self,
        urls: list[str] | str,
        token: str | Callable[[], str],
        *,
        reconnect: bool = True,
        backoff_base: float = 0.2,
        backoff_max: float = 5.0,
        on_message: OnMessage | None = None,
        on_frame: OnFrame | None = None,
        request_timeout: float = 10.0,
        open_timeout: float = 5.0,
        max_queue: int = 10_000,
        dedupe_window: int = 10_000,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        on_presence: OnSignal | None = None,
        on_typing: OnSignal | None = None,
        on_read: OnSignal | None = None,
        token_in: TokenIn = "header",
    ) -> None:
        """`token_in`: where the token goes on each connect: the `Sec-WebSocket-Protocol` header
        (default; a token that does not fit there, over 4 KB or not an HTTP token, goes in the first
        frame instead), the first frame (`{"type":"auth"}`: any size up to the server's frame
        limit), or the URL's query (as before the header was known; proxies may log it)."""
        self._urls = [urls] if isinstance(urls, str) else list(urls)
        if not self._urls:
            raise ValueError("at least one URL is needed")
        self._token = token
        self._token_in = token_in
        self._reconnect, self._base, self._max = reconnect, backoff_base, backoff_max
        self._on_message = on_message
        self._on_signal: dict[str, OnSignal | None] = {"presence_event": on_presence, "typing": on_typing,
                                                       "read": on_read}
        self.user = _subject(token) if isinstance(token, str) else ""  # the token's `sub`
        self._on_frame = on_frame
        self._timeout, self._open_timeout, self._window = request_timeout, open_timeout, dedupe_window
        self._max_frame = max_frame_bytes
        # without on_message, received messages wait here; a full queue stops reading (back-pressure)
        self._inbox: asyncio.Queue[Frame | None] = asyncio.Queue(max_queue)
        self._rooms: dict[str, _Room] = {}
        self._sends: dict[str, _Send] = {}
        self._joins: dict[str, list[asyncio.Future[Frame]]] = {}
        # (answer type, room) -> requests awaiting that answer, oldest first: (frame, future)
        self._requests: dict[tuple[str, str], deque[tuple[str, asyncio.Future[Frame]]]] = {}
        # room -> its joins and history requests not answered yet, oldest first: an error frame
        # names the room it is about, not the request, so it fails the oldest of them
        self._by_room: dict[str, deque[asyncio.Future[Frame]]] = {}
        self._out: asyncio.Queue[str] | None = None  # the current connection's outgoing frames
        self._gen = 0
        self._task: asyncio.Task[None] | None = None
        self._done = False
        self.error: RoomcastError | None = None  # why the client stopped, when it was not closed
        self.reconnects = self.resends = self.duplicates_dropped = 0
        self.gaps = 0  # re-joins the server could not fully replay (`recovered: false`)
        self.errors = 0  # error frames that matched no pending send, join or history

    # --- lifecycle
    async def start(self) -> None:
        """Connect and see the server answer a ping (a refused token closes the socket first).
        Raises AuthError, ConnectionLost, or TimeoutError after request_timeout."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="roomcast-client")
        try:
            await self.ping()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._finish(ClientClosed())

    async def __aenter__(self) -> RoomcastClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- requests
    async def join(self, room: str, cursor: str | None = None, presence: bool = False) -> Frame:
        """Subscribe; with a cursor, the server first replays every message after it. With presence,
        `on_presence` gets the room's presence events. The `joined` frame has the user's
        `read_cursor` and `unread` count of the room."""
        self._encode({"type": "join", "room": room, "cursor": cursor or ""})  # (too_large before anything changes)
        state = self._rooms.setdefault(room, _Room(self._window))
        state.presence = presence
        if cursor:
            state.set_cursor(cursor)
        fut = self._room_future(room)
        self._joins.setdefault(room, []).append(fut)
        self._write(self._join_frame(room, state))
        try:
            return await asyncio.wait_for(fut, self._timeout)
        except BaseException:
            if fut in (waiting := self._joins.get(room, [])):
                waiting.remove(fut)
            if not state.confirmed and self._rooms.get(room) is state:
                del self._rooms[room]  # never joined: do not re-join it on every reconnect
            raise

    async def leave(self, room: str) -> None:
        for fut in self._joins.pop(room, []):
            fut.cancel()
        if self._rooms.pop(room, None) is not None:
            self._write(self._encode({"type": "leave", "room": room}))

    def send_nowait(self, room: str, body: str, client_msg_id: str | None = None) -> asyncio.Future[Frame]:
        """Queue a send; the future resolves to its `ack`. Many may be in flight at once. Raises
        RoomcastError `too_large` at once for a frame the server would close the connection for."""
        return self._submit({"type": "send", "room": room, "body": body}, client_msg_id)

    async def edit(self, room: str, msg_id: str, body: str, client_msg_id: str | None = None) -> Frame:
        """Change the body of one's own message `msg_id`; its `ack` (resent like a send until then).
        Raises RoomcastError `forbidden` (not the author) or `not_found`."""
        return await self._submit({"type": "edit", "room": room, "id": msg_id, "body": body}, client_msg_id)

    async def delete(self, room: str, msg_id: str, client_msg_id: str | None = None) -> Frame:
        """Delete message `msg_id` (one's own, or any with a token whose `mod` claim names the room);
        its `ack`. Raises RoomcastError `forbidden` or `not_found`."""
        return await self._submit({"type": "delete", "room": room, "id": msg_id}, client_msg_id)

    def _submit(self, fields: Frame, client_msg_id: str | None) -> asyncio.Future[Frame]:
        """Queue a send, edit or delete: kept and resent under its client_msg_id until its ack."""
        cmid = client_msg_id or uuid.uuid4().hex
        if cmid in self._sends:
            return self._sends[cmid].future
        frame = self._encode({**fields, "client_msg_id": cmid})
        pending = _Send(cmid, frame, self._future())
        self._sends[cmid] = pending
        pending.future.add_done_callback(lambda _: self._forget(pending))
        self._write_send(pending)
        return pending.future

    async def send(self, room: str, body: str, client_msg_id: str | None = None) -> Frame:
        return await self.send_nowait(room, body, client_msg_id)

    async def history(self, room: str, before: str | None = None, limit: int = 50) -> Frame:
        frame: Frame = {"type": "history", "room": room, "limit": limit}
        if before:
            frame["before"] = before
        return await self._request(("history", room), self._encode(frame), self._room_future(room))

    async def presence(self, room: str) -> Frame:
        """Who is online in `room`: `{"users": [...], "count": N}` (at most 1,000 users listed)."""
        return await self._request(("presence", room), self._encode({"type": "presence", "room": room}),
                                   self._room_future(room))

    def typing(self, room: str) -> bool:
        """Say the user is typing in a joined room; sent at most once per TYPING_INTERVAL_S per room
        (call it on every keystroke). True when a frame went out."""
        state = self._rooms.get(room)
        now = time.monotonic()
        if state is None or not state.confirmed or now - state.typed < TYPING_INTERVAL_S:
            return False
        state.typed = now
        self._write(self._encode({"type": "typing", "room": room}))
        return True

    async def read(self, room: str, cursor: str) -> Frame:
        """Mark `room` read up to the message at `cursor`; the answer is the mark now held (never
        moved back), once the server's durable log has it. Resent after a reconnect until answered."""
        return await self._request(("read", room), self._encode({"type": "read", "room": room, "cursor": cursor}),
                                   self._room_future(room))

    async def unread(self) -> Frame:
        """Unread counts of every room with read state: `{"rooms": [{room, count, more, read_cursor}]}`."""
        return await self._request(("unread", ""), '{"type":"unread"}')

    async def ping(self) -> float:
        """Round-trip time in seconds."""
        t0 = time.monotonic()
        await self._request(("pong", ""), '{"type":"ping"}')
        return time.monotonic() - t0

    def cursor(self, room: str) -> str:
        """The last cursor received in a joined room ("" when none)."""
        state = self._rooms.get(room)
        return state.cursor if state is not None else ""

    def messages(self) -> AsyncIterator[Frame]:
        return self

    def __aiter__(self) -> AsyncIterator[Frame]:
        return self

    async def __anext__(self) -> Frame:
        """The next received message; ends when the client closes, raises why it stopped."""
        frame = None if self._done and self._inbox.empty() else await self._inbox.get()
        if frame is None:
            with contextlib.suppress(asyncio.QueueFull):
                self._inbox.put_nowait(None)  # wake any other reader too
            if self.error is not None:
                raise self.error
            raise StopAsyncIteration
        return frame

    # --- the connection loop
    async def _run(self) -> None:
        index, attempt, auth_strikes = random.randrange(len(self._urls)), 0, 0
        try:
            while True:
                code, reason, healthy = await self._connect_once(self._urls[index])
                if healthy:
                    attempt, auth_strikes = 0, 0
                if code == Close.BAD_TOKEN:
                    auth_strikes += 1  # a token callable gets one chance to mint a fresh token
                    if isinstance(self._token, str) or auth_strikes > 1:
                        raise AuthError(f"the server refused the connection (1008: {reason or 'no reason given'})")
                if not self._reconnect:
                    raise ConnectionLost(f"connection closed (code {code})")
                index = (index + 1) % len(self._urls)
                await asyncio.sleep(self._backoff(0 if code in RESUME_SOON else attempt))
                attempt += 1
        except RoomcastError as e:
            self._finish(e)
        except Exception as e:
            log.exception("roomcast client crashed")
            self._finish(ConnectionLost(f"client crashed: {e!r}"))
            raise

    async def _connect_once(self, url: str) -> tuple[int | None, str, bool]:
        """One connection's life: (its close code or None if it never opened, the close reason,
        whether frames came)."""
        token = self._token() if callable(self._token) else self._token
        self.user = _subject(token)
        url = f"{url.rstrip('/')}/ws?v={PROTOCOL_VERSION}"
        subprotocols = [Subprotocol(SUBPROTOCOL)]
        token_in = self._token_in
        if token_in == "header" and not HEADER_TOKEN.fullmatch(token):
            token_in = "frame"
        if token_in == "header":
            subprotocols.append(Subprotocol(BEARER_PREFIX + token))
        elif token_in == "query":
            url += f"&token={quote(token, safe='')}"
        try:
            ws = await connect(url, subprotocols=subprotocols, open_timeout=self._open_timeout,
                               max_size=MAX_RECEIVED_BYTES)
        except InvalidStatus as e:
            if e.response.status_code in (401, 403):
                return Close.BAD_TOKEN, f"HTTP {e.response.status_code}", False
            log.warning("connect %s: %s", url, e)
            return None, "", False
        except (OSError, TimeoutError, InvalidHandshake) as e:
            log.warning("connect %s: %s", url, e)
            return None, "", False
        healthy = False
        auth = orjson.dumps({"type": "auth", "token": token}).decode() if token_in == "frame" else None
        writer = asyncio.create_task(self._writer(ws, self._resume(auth)), name="roomcast-writer")
        try:
            async for raw in ws:
                healthy = True
                frame = orjson.loads(raw)
                if self._on_frame is not None:
                    self._on_frame(frame)
                await self._dispatch(frame)
        except ConnectionClosed:
            pass
        finally:
            self._out = None
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            await ws.close()
        return ws.close_code, ws.close_reason or "", healthy

    def _resume(self, auth: str | None) -> asyncio.Queue[str]:
        """A new connection: authenticate when the token goes in a frame, re-join every room at its
        cursor, then repeat what is unanswered."""
        self._gen += 1
        if self._gen > 1:
            self.reconnects += 1
        self._out = asyncio.Queue()
        if auth is not None:
            self._out.put_nowait(auth)
        for room, state in self._rooms.items():
            self._write(self._join_frame(room, state))
        for key, waiting in self._requests.items():
            self._requests[key] = deque((t, f) for t, f in waiting if not f.done())
            for text, _ in self._requests[key]:
                self._write(text)
        for pending in self._sends.values():
            self._write_send(pending)
        return self._out

    def _rejoin_later(self, room: str) -> None:
        """A re-join nobody awaits was refused (e.g. `unavailable` while storage recovers): send it
        again after a back-off. Only then: a join sent again while the first is still answered would
        have its replay sent twice."""
        state = self._rooms.get(room)
        if state is None or state.confirmed == self._gen:
            return
        state.refused += 1
        if state.retry is not None:
            state.retry.cancel()
        state.retry = asyncio.get_running_loop().call_later(
            self._backoff(state.refused), self._rejoin, room, state, self._gen)

    def _rejoin(self, room: str, state: _Room, gen: int) -> None:
        state.retry = None
        if gen == self._gen and self._rooms.get(room) is state and state.confirmed != gen:
            self._write(self._join_frame(room, state))

    @staticmethod
    async def _writer(ws: ClientConnection, out: asyncio.Queue[str]) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await ws.send(await out.get())

    # --- frames from the server
    async def _dispatch(self, frame: Frame) -> None:
        kind = frame.get("type")
        if kind in ("message", "edit", "delete"):
            await self._on_message_frame(frame)
        elif kind == "ack":
            pending = self._sends.pop(frame.get("client_msg_id", ""), None)
            if pending is not None and not pending.future.done():
                pending.future.set_result(frame)
        elif kind == "joined":
            self._on_joined(frame)
        elif kind in ("history", "pong", "presence", "unread"):
            self._resolve_first(self._requests.get((kind, frame.get("room", "")), deque()), frame)
        elif kind == "error":
            self._on_error(frame)
        elif kind in ("presence_event", "typing", "read"):
            if kind == "read" and frame.get("user") == self.user:  # the answer to our read, or another device's
                self._resolve_first(self._requests.get(("read", frame.get("room", "")), deque()), frame)
            callback = self._on_signal[kind]
            if callback is not None and inspect.isawaitable(result := callback(frame)):
                await result
        # other types (e.g. `left`) need nothing from us

    async def _on_message_frame(self, frame: Frame) -> None:
        state = self._rooms.get(frame.get("room", ""))
        if state is None:  # left meanwhile
            return
        cursor = frame.get("cursor", "")
        # (an edit or delete names the message; it is its own record of the room, at its cursor)
        key = frame.get("id", "") if frame["type"] == "message" else f"{frame['type']}@{cursor}"
        if not state.accept(key, cursor):
            self.duplicates_dropped += 1
            return
        if self._on_message is None:
            await self._inbox.put(frame)
        elif inspect.isawaitable(result := self._on_message(frame)):
            await result

    def _on_joined(self, frame: Frame) -> None:
        room = frame.get("room", "")
        state = self._rooms.get(room)
        if state is not None:
            state.confirmed, state.refused = self._gen, 0
            if not state.cursor:
                state.set_cursor(frame.get("cursor", ""))
        if frame.get("recovered") is False:
            self.gaps += 1
            log.warning("room %s: the server could not replay every missed message", room)
        for fut in self._joins.pop(room, []):
            if not fut.done():
                fut.set_result(frame)

    def _on_error(self, frame: Frame) -> None:
        err = RoomcastError(str(frame.get("code")), str(frame.get("reason", "")), frame)
        ref = frame.get("ref")
        pending = self._sends.get(ref) if isinstance(ref, str) else None
        if pending is None:
            request = self._oldest_request(ref) if isinstance(ref, str) and err.code != "not_joined" else None
            if request is not None:  # a join or history of that room
                request.set_exception(err)
            else:  # (`not_joined` answers a leave, which nobody awaits; a re-join's error is retried)
                self.errors += 1
                log.warning("server error: %s", err)
                if isinstance(ref, str) and err.code != "not_joined":
                    self._rejoin_later(ref)
        elif err.code == "unavailable":  # nothing was published: keep it and try again later
            pending.attempts += 1
            if pending.timer is not None:
                pending.timer.cancel()
            pending.timer = asyncio.get_running_loop().call_later(
                self._backoff(pending.attempts), self._retry, pending, pending.gen)
        else:
            self._forget(pending)
            pending.future.set_exception(err)

    # --- helpers
    async def _request(self, answer: tuple[str, str], text: str, fut: asyncio.Future[Frame] | None = None) -> Frame:
        """Send a request answered by the next frame of type answer[0] for room answer[1]."""
        fut = fut if fut is not None else self._future()
        self._requests.setdefault(answer, deque()).append((text, fut))
        self._write(text)
        return await asyncio.wait_for(fut, self._timeout)

    def _retry(self, pending: _Send, gen: int) -> None:
        pending.timer = None
        if pending.gen == gen and not pending.future.done():  # else a reconnect already resent it
            self._write_send(pending)

    def _write_send(self, pending: _Send) -> None:
        if self._out is not None:
            if pending.gen:
                self.resends += 1
            pending.gen = self._gen
            self._out.put_nowait(pending.frame)

    def _write(self, text: str) -> None:
        if self._out is not None:
            self._out.put_nowait(text)

    def _encode(self, frame: Frame) -> str:
        """The frame's JSON text; RoomcastError `too_large` when it is over max_frame_bytes (the server
        would close the connection 1009, and a resend after the reconnect would do it again)."""
        raw = orjson.dumps(frame)
        if len(raw) > self._max_frame:
            raise RoomcastError("too_large", f"a {frame['type']} frame of {len(raw)} bytes; the limit is "
                                             f"{self._max_frame}")
        return raw.decode()

    @staticmethod
    def _join_frame(room: str, state: _Room) -> str:
        frame: Frame = {"type": "join", "room": room}
        if state.cursor:
            frame["cursor"] = state.cursor
        if state.presence:
            frame["presence"] = True
        return orjson.dumps(frame).decode()  # (its room's size was checked by the first join)

    @staticmethod
    def _resolve_first(waiting: deque[tuple[str, asyncio.Future[Frame]]], frame: Frame) -> None:
        while waiting:
            _, fut = waiting.popleft()
            if not fut.done():
                fut.set_result(frame)
                return

    def _forget(self, pending: _Send) -> None:
        if self._sends.get(pending.cmid) is pending:
            del self._sends[pending.cmid]

    def _backoff(self, attempt: int) -> float:
        return random.uniform(0, min(self._max, self._base * 2 ** min(attempt, 30)))

    def _room_future(self, room: str) -> asyncio.Future[Frame]:
        """The future of a join or history request for `room`, in its room's line until done."""
        fut = self._future()
        line = self._by_room.setdefault(room, deque())
        line.append(fut)

        def done(_: object) -> None:
            line.remove(fut)
            if not line and self._by_room.get(room) is line:
                del self._by_room[room]

        fut.add_done_callback(done)
        return fut

    def _oldest_request(self, room: str) -> asyncio.Future[Frame] | None:
        line = self._by_room.get(room)
        return next((f for f in line if not f.done()), None) if line else None

    def _future(self) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self._done:
            fut.set_exception(self.error or ClientClosed())
        return fut

    def _finish(self, err: RoomcastError) -> None:
        """Stop for good: fail everything still waiting, end the message iterators."""
        if self._done:
            return
        self._done, self._out = True, None
        if not isinstance(err, ClientClosed):
            self.error = err
        for timer in [*(r.retry for r in self._rooms.values()), *(p.timer for p in self._sends.values())]:
            if timer is not None:
                timer.cancel()
        waiting: list[asyncio.Future[Any]] = [p.future for p in self._sends.values()]
        waiting += [f for fs in self._joins.values() for f in fs]
        waiting += [f for q in self._requests.values() for _, f in q]
        for fut in waiting:
            if not fut.done():
                fut.set_exception(err)
                fut.exception()  # retrieved: nobody may be awaiting it any more
        with contextlib.suppress(asyncio.QueueFull):
            self._inbox.put_nowait(None)


def apply(messages: dict[str, Frame], frame: Frame) -> None:
    """Apply a `message`, `edit` or `delete` frame to `messages` (id -> the message as history shows
    it): in order, every frame once or more, it ends as the server's history. A delete is final."""
    kind, msg_id = frame.get("type"), frame.get("id", "")
    if kind == "message":
        messages[msg_id] = {k: v for k, v in frame.items() if k != "type"}
    elif kind == "edit" and msg_id in messages and not messages[msg_id].get("deleted"):
        messages[msg_id] = {**messages[msg_id], "body": frame["body"], "edited_ts": frame["edited_ts"]}
    elif kind == "delete" and msg_id in messages:
        messages[msg_id] = {"id": msg_id, "cursor": messages[msg_id].get("cursor"), "deleted": True}


def _subject(token: str) -> str:
    """The `sub` claim of a JWT, read without checking it (the server does): the user's own read
    marks are told from other users' receipts by it."""
    try:
        payload = token.split(".")[1]
        claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, binascii.Error):
        return ""
    sub = claims.get("sub") if isinstance(claims, dict) else None
    return sub if isinstance(sub, str) else ""
