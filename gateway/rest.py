"""REST history: `GET /rooms/{room}/messages?before=&limit=`, the same pages as the `history` frame.

Auth: `Authorization: Bearer <JWT>` or `?token=`. Answers 200 with `{"room","messages","next"}`;
401 without or with a bad token, 400 for a bad room, cursor or limit, 403 for a room the token does
not allow, 503 when a store the page needs is down. Errors are `{"error": code, "reason": text}`.
"""

from __future__ import annotations

from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.node import Node
from gateway.protocol import Err
from shared.auth import AuthError, verify_token
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


def _room_of(request: Request) -> tuple[str, Response | None]:
    """The path's room, or the answer refusing it (bad token, bad room, no access)."""
    node: Node = request.state.node
    try:
        identity = verify_token(node.settings, _token(request))
    except AuthError as e:
        return "", _error(401, "unauthorized", f"bad token: {e}"[:120], **{"WWW-Authenticate": "Bearer"})
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
