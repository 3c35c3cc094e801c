"""Wire protocol v1: inbound frame schemas, outbound frame builders, error and close codes."""

from __future__ import annotations

from enum import IntEnum
from typing import Annotated, Literal

import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictStr, TypeAdapter, ValidationError
from pydantic_core import PydanticCustomError

from shared.errors import Err as Err  # (the error codes are named with the error types)

PROTOCOL_VERSION = "1"
# A client may carry its token in the Sec-WebSocket-Protocol header instead of the URL (which
# proxies write to their access logs): it offers SUBPROTOCOL, which the server selects and echoes,
# and BEARER_PREFIX + the JWT, which is never echoed (the pattern Kubernetes' API server uses).
SUBPROTOCOL = "roomcast.v1"
BEARER_PREFIX = "bearer."


class Close(IntEnum):
    NORMAL = 1000
    BAD_TOKEN = 1008
    TOO_LARGE = 1009
    DRAINING = 1012  # reconnect elsewhere and resume
    TRY_AGAIN_LATER = 1013  # a limit was reached (this user's connections): reconnect with back-off
    TOO_SLOW = 4008  # reconnect and resume with the last cursor


class _Frame(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Join(_Frame):
    type: Literal["join"]
    room: StrictStr
    cursor: StrictStr | None = None
    presence: StrictBool = False


class Leave(_Frame):
    type: Literal["leave"]
    room: StrictStr


def _not_blank(body: str) -> str:
    """A body is text a person can see: not empty, not only whitespace (as `str.isspace` has it)."""
    if not body.strip():
        raise PydanticCustomError("blank", "empty or only whitespace")
    return body


class Send(_Frame):
    type: Literal["send"]
    room: StrictStr
    client_msg_id: Annotated[StrictStr, Field(min_length=1, max_length=128)]
    body: Annotated[StrictStr, AfterValidator(_not_blank)]


MessageId = Annotated[StrictStr, Field(min_length=1, max_length=64)]


class Edit(_Frame):
    type: Literal["edit"]
    room: StrictStr
    id: MessageId
    client_msg_id: Annotated[StrictStr, Field(min_length=1, max_length=128)]
    body: Annotated[StrictStr, AfterValidator(_not_blank)]


class Delete(_Frame):
    type: Literal["delete"]
    room: StrictStr
    id: MessageId
    client_msg_id: Annotated[StrictStr, Field(min_length=1, max_length=128)]


class History(_Frame):
    type: Literal["history"]
    room: StrictStr
    before: StrictStr | None = None
    limit: Annotated[int, Field(strict=True, ge=1)] | None = None


class Ping(_Frame):
    type: Literal["ping"]


class Presence(_Frame):
    type: Literal["presence"]
    room: StrictStr


class Typing(_Frame):
    type: Literal["typing"]
    room: StrictStr


class Read(_Frame):
    type: Literal["read"]
    room: StrictStr
    cursor: StrictStr


class Unread(_Frame):
    type: Literal["unread"]


class Auth(_Frame):
    """The first frame of a connection whose handshake carried no token."""

    type: Literal["auth"]
    token: StrictStr


Inbound = Join | Leave | Send | Edit | Delete | History | Ping | Presence | Typing | Read | Unread
_INBOUND: TypeAdapter[Inbound] = TypeAdapter(Annotated[Inbound, Field(discriminator="type")])
KNOWN_TYPES = frozenset({"join", "leave", "send", "edit", "delete", "history", "ping", "presence", "typing", "read",
                         "unread"})
WRITES = ("send", "edit", "delete")  # frames acknowledged by client_msg_id


class FrameError(Exception):
    def __init__(self, code: str, reason: str, ref: str | None = None) -> None:
        super().__init__(reason)
        self.code, self.reason, self.ref = code, reason, ref


REF_MAX = 128  # a longer room or client_msg_id is invalid anyway: not echoed back
CURSOR_MAX = 64


def ref_of(value: object) -> str | None:
    """`value` as the `ref` of an error frame: a short string, else None (never echo a huge field)."""
    return value if isinstance(value, str) and len(value) <= REF_MAX else None


def _ref(raw: dict[str, object]) -> str | None:
    """What an error about this frame refers to: a send's, edit's or delete's client_msg_id, else its
    room (clients match errors to their requests by it)."""
    return ref_of(raw.get("client_msg_id") if raw.get("type") in WRITES else raw.get("room"))


def parse_frame(text: str) -> Inbound:
    """A validated inbound frame, or FrameError with the code to answer."""
    try:
        raw = orjson.loads(text)
    except orjson.JSONDecodeError as e:  # includes lone surrogates (\ud800), NaN, depth > 1024
        raise FrameError(Err.BAD_FRAME, f"not JSON: {e.msg}"[:120]) from None
    if not isinstance(raw, dict):
        raise FrameError(Err.BAD_FRAME, "a frame is a JSON object")
    kind = raw.get("type")
    ref = _ref(raw)
    if not isinstance(kind, str) or kind not in KNOWN_TYPES:  # (a list is not hashable)
        shown = repr(kind[:40]) if isinstance(kind, str) else type(kind).__name__
        raise FrameError(Err.UNKNOWN_TYPE, f"unknown type {shown}", ref)
    try:
        frame = _INBOUND.validate_python(raw)
    except ValidationError as e:
        first = e.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(p) for p in first["loc"][1:]) or "frame"
        raise FrameError(Err.BAD_FRAME, f"{where}: {first['msg']}"[:200], ref) from None
    cursor = (frame.cursor if isinstance(frame, Join | Read) else frame.before if isinstance(frame, History)
              else None)
    if cursor and (len(cursor) > CURSOR_MAX or not cursor.isascii()):
        raise FrameError(Err.BAD_CURSOR, "bad cursor: cursors are short ASCII strings from the server", ref)
    return frame


def parse_auth(text: str | None) -> str:
    """The token of an auth frame, or FrameError."""
    try:
        return Auth.model_validate_json(text or "").token
    except ValidationError:
        raise FrameError(Err.BAD_FRAME, "the first frame must be an auth frame with the token") from None


def dumps(frame: dict[str, object]) -> str:
    return orjson.dumps(frame).decode()


def error(code: str, reason: str, ref: str | None = None, **extra: object) -> str:
    return dumps({"type": "error", "code": code, "reason": reason, "ref": ref, **extra})


PONG = dumps({"type": "pong"})
