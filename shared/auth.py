"""Signed tokens (JWT): `sub` is the user id; an optional `rooms` claim limits where the user may go."""

from __future__ import annotations

import time
from dataclasses import dataclass

import jwt

from shared.settings import Settings


class AuthError(Exception):
    """Missing, malformed, badly signed or expired token."""


@dataclass(frozen=True, slots=True)
class Identity:
    user: str
    rooms: tuple[str, ...]  # names or prefixes ending in '*'; ('*',) = every room
    expires_at: float | None

    def may_access(self, room: str) -> bool:
        for pattern in self.rooms:
            if pattern == "*" or pattern == room or (pattern.endswith("*") and room.startswith(pattern[:-1])):
                return True
        return False


def mint_token(settings: Settings, user: str, rooms: list[str] | None = None, ttl_s: int | None = None) -> str:
    now = int(time.time())
    claims: dict[str, object] = {"sub": user, "iat": now, "exp": now + (ttl_s or settings.token_ttl_s),
                                 "rooms": rooms if rooms is not None else ["*"]}
    return jwt.encode(claims, settings.jwt_secret.get_secret_value(), algorithm=settings.jwt_algorithm)


def verify_token(settings: Settings, token: str | None) -> Identity:
    if not token:
        raise AuthError("no token")
    try:
        claims = jwt.decode(token, settings.jwt_secret.get_secret_value(), algorithms=[settings.jwt_algorithm],
                            options={"require": ["sub", "exp"]})
    except jwt.PyJWTError as e:
        raise AuthError(str(e)) from e
    user, rooms = claims.get("sub"), claims.get("rooms", ["*"])
    if not isinstance(user, str) or not user or len(user) > 255:
        raise AuthError("bad sub claim")
    if not isinstance(rooms, list) or not all(isinstance(r, str) for r in rooms):
        raise AuthError("bad rooms claim")
    return Identity(user, tuple(rooms), float(claims["exp"]))
