"""Signed tokens (JWT): `sub` is the user id; the `rooms` claim limits where the user may go; an
optional `mod` claim (the same patterns) names the rooms where the user moderates (deletes any
message)."""

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
    mod: tuple[str, ...] = ()  # rooms where the user moderates, as `rooms`

    def may_access(self, room: str) -> bool:
        return _matches(self.rooms, room)

    def may_moderate(self, room: str) -> bool:
        return _matches(self.mod, room)


def _matches(patterns: tuple[str, ...], room: str) -> bool:
    for pattern in patterns:
        if pattern == "*" or pattern == room or (pattern.endswith("*") and room.startswith(pattern[:-1])):
            return True
    return False


def mint_token(settings: Settings, user: str, rooms: list[str] | None = None, ttl_s: int | None = None,
               mod: list[str] | None = None) -> str:
    """A token the gateways accept: with the configured audience and issuer, when there are."""
    now = int(time.time())
    claims: dict[str, object] = {"sub": user, "iat": now, "exp": now + (ttl_s or settings.token_ttl_s),
                                 "rooms": rooms if rooms is not None else ["*"]}
    if mod:
        claims["mod"] = mod
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    return jwt.encode(claims, settings.jwt_secret.get_secret_value(), algorithm=settings.jwt_algorithm)


def _text(value: object, max_chars: int) -> bool:
    """A non-empty string of at most max_chars that is valid Unicode text: Python's JSON decoder
    (PyJWT's) lets lone surrogates such as "\\ud800" through, and those cannot be encoded again."""
    if not isinstance(value, str) or not value or len(value) > max_chars:
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def verify_token(settings: Settings, token: str | None) -> Identity:
    """The identity of a valid token. Only the configured algorithm is accepted (never `none`, nor
    another HMAC size), `sub`, `exp` and `rooms` are required: a token without a `rooms` claim
    (e.g. one minted for another service with the same secret) is refused, never read as "all rooms".
    With JWT_AUDIENCE / JWT_ISSUER set, `aud` / `iss` are required and must match (PyJWT's checks;
    without an audience set, a token that names one is refused: it was minted for another service).
    A token is valid from its `nbf` (if any) until its `exp`; `iat` is not checked: a gateway whose
    clock is behind the issuer's refused every fresh token as "not yet valid" for that long."""
    if not token:
        raise AuthError("no token")
    try:
        claims = jwt.decode(token, settings.jwt_secret.get_secret_value(), algorithms=[settings.jwt_algorithm],
                            audience=settings.jwt_audience or None, issuer=settings.jwt_issuer or None,
                            options={"require": ["sub", "exp", "rooms"], "verify_iat": False})
    except jwt.PyJWTError as e:
        raise AuthError(str(e)) from e
    user, rooms = claims["sub"], claims["rooms"]
    if not _text(user, 255):
        raise AuthError("bad sub claim")
    if not isinstance(rooms, list):
        raise AuthError("bad rooms claim: not a list")
    if len(rooms) > settings.token_max_rooms:
        raise AuthError(f"rooms claim has more than {settings.token_max_rooms} entries")
    if not all(_text(r, 128) for r in rooms):
        raise AuthError("bad rooms claim")
    mod = claims.get("mod", [])
    if not isinstance(mod, list) or len(mod) > settings.token_max_rooms or not all(_text(r, 128) for r in mod):
        raise AuthError("bad mod claim")
    return Identity(user, tuple(rooms), float(claims["exp"]), tuple(mod))
