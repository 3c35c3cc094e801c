"""Roomcast's errors: one hierarchy, and the wire error codes a client gets (docs/protocol.md).

Each error knows the `code` of the error frame it becomes, the HTTP `status` of a REST answer, and
whether the same request may succeed later (`retriable`), so callers catch a kind, not a module's
private class.
"""

from __future__ import annotations


class Err:
    BAD_FRAME = "bad_frame"
    UNKNOWN_TYPE = "unknown_type"
    TOO_LARGE = "too_large"
    RATE_LIMITED = "rate_limited"
    FORBIDDEN = "forbidden"
    NOT_JOINED = "not_joined"
    UNAVAILABLE = "unavailable"
    BAD_CURSOR = "bad_cursor"
    LIMIT = "limit_exceeded"
    NOT_FOUND = "not_found"


class RoomcastError(Exception):
    code = Err.UNAVAILABLE
    status = 500
    retriable = False

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BadRequest(RoomcastError):
    """The request itself is wrong (a bad cursor, limit or room): asking again will not help."""

    status = 400

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code


class Forbidden(BadRequest):
    """Not allowed for this user (a room outside the token's, an edit of someone else's message)."""

    status = 403

    def __init__(self, reason: str) -> None:
        super().__init__(Err.FORBIDDEN, reason)


class NotFound(BadRequest):
    """The message an edit or delete names is not in the room (or was deleted)."""

    status = 404

    def __init__(self, reason: str) -> None:
        super().__init__(Err.NOT_FOUND, reason)


class Unavailable(RoomcastError):
    """A dependency (Kafka, Redis, MySQL) did not answer: nothing was promised; try again later."""

    status = 503
    retriable = True


class StoreUnavailable(Unavailable):
    """Redis or MySQL did not answer a read or write of stored messages."""


class StoreRefused(RoomcastError):
    """MySQL refused the rows themselves (a value longer than its column, out of range, a failed
    constraint): the same write fails again however often it is tried."""
