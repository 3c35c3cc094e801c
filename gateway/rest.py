"""REST: history (`GET /rooms/{room}/messages?before=&limit=`, the same pages as the `history`
frame), presence, and the publish API for services (`POST /rooms/{room}/messages`, a `send`).

Auth: `Authorization: Bearer <JWT>` or `?token=`. History answers 200 with
`{"room","messages","next"}`; 401 without or with a bad token, 400 for a bad room, cursor or limit,
403 for a room the token does not allow, 503 when a store the page needs is down. Errors are
`{"error": code, "reason": text}`.

A publish is a WebSocket send without the socket: the same checks (check_send), the same per-user
budget across gateways (Quota.take), the same claim and ack (Publisher.send), so a retry with the
same client_msg_id, to any gateway, gets the first ack and is not published twice. It answers 200
with the ack; 400 for a body that is not `{"client_msg_id", "body"}` as a send has them, 413 for a
body over MAX_BODY_CHARS (or a request over MAX_FRAME_BYTES), 429 with Retry-After, 503 when the
broker or the dedupe store did not take it (no ack: send it again).
"""

from __future__ import annotations

import math

import orjson
from pydantic import ValidationError
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.node import Node
from gateway.protocol import Err, Send
from gateway.publisher import check_send
from shared.auth import AuthError, Identity, verify_token
from shared.errors import RoomcastError
from shared.validation import valid_room

NO_STORE = {"Cache-Control": "no-store"}


def _error(status: int, code: str, reason: str, **headers: str) -> Response:
    return JSONResponse({"error": code, "reason": reason}, status_code=status, headers={**NO_STORE, **headers})


def _token(request: Request) -> str | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.query_params.get("token")


def _identity(request: Request) -> Identity | Response:
    node: Node = request.state.node
    try:
        return verify_token(node.settings, _token(request))
    except AuthError as e:
        return _error(401, "unauthorized", f"bad token: {e}"[:120], **{"WWW-Authenticate": "Bearer"})


def _room_of(request: Request) -> tuple[str, Response | None]:
    """The path's room, or the answer refusing it (bad token, bad room, no access)."""
    identity = _identity(request)
    if isinstance(identity, Response):
        return "", identity
    room = request.path_params["room"]
    if not valid_room(room):
        return room, _error(400, Err.BAD_FRAME, "room: 1-64 characters of A-Z a-z 0-9 _ . -")
    if not identity.may_access(room):
        return room, _error(403, Err.FORBIDDEN, f"no access to room {room}")
    return room, None


async def room_presence(request: Request) -> Response:
    """`GET /rooms/{room}/presence`: `{"room","users","count"}` like the `presence` frame."""
    node: Node = request.state.node
    room, refused = _room_of(request)
    if refused is not None:
        return refused
    try:
        users, count = await node.presence.query(room)
    except (RedisError, OSError):
        return _error(503, Err.UNAVAILABLE, "presence store unavailable")
    return JSONResponse({"room": room, "users": users, "count": count}, headers=NO_STORE)


async def room_messages(request: Request) -> Response:
    node: Node = request.state.node
    room, refused = _room_of(request)
    if refused is not None:
        return refused
    raw_limit = request.query_params.get("limit", "")
    if raw_limit and not (raw_limit.isascii() and raw_limit.isdigit() and len(raw_limit) <= 9):
        return _error(400, Err.BAD_FRAME, "limit must be a positive integer")
    try:
        page = await node.history.page(room, request.query_params.get("before"),
                                           int(raw_limit) if raw_limit else None)
    except RoomcastError as e:
        return _error(e.status, e.code, e.reason)
    return Response(page.body(room, frame=False), media_type="application/json", headers=NO_STORE)


async def publish(request: Request) -> Response:
    """`POST /rooms/{room}/messages` with `{"client_msg_id", "body"}`: a send; 200 with its ack."""
    node: Node = request.state.node
    s = node.settings
    identity = _identity(request)
    if isinstance(identity, Response):
        return identity
    raw = await request.body()
    if len(raw) > s.max_frame_bytes:
        return _error(413, Err.TOO_LARGE, f"request body over {s.max_frame_bytes} bytes")
    try:
        fields = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        return _error(400, Err.BAD_FRAME, f"not JSON: {e.msg}"[:120])
    if not isinstance(fields, dict):
        return _error(400, Err.BAD_FRAME, 'the body is a JSON object: {"client_msg_id": ..., "body": ...}')
    room = request.path_params["room"]
    try:
        send = Send.model_validate(dict(fields, type="send", room=room))
    except ValidationError as e:
        first = e.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        return _error(400, Err.BAD_FRAME, f"{where}: {first['msg']}"[:200])
    try:
        check_send(s, identity, room, send.body)
        wait = await node.quota.take(identity.user, node.senders.state(identity.user))
        if wait > 0:
            return _error(429, Err.RATE_LIMITED, "sending too fast", **{"Retry-After": str(math.ceil(wait))})
        ack = await (await node.publisher.send(identity.user, room, send.client_msg_id, send.body))
    except RoomcastError as e:
        return _error(413 if e.code == Err.TOO_LARGE else e.status, e.code, e.reason)
    return Response(ack, media_type="application/json", headers=NO_STORE)
