"""Names that reach Redis keys and SQL: room syntax is checked once, here.

A room is 1-64 ASCII letters, digits, `_`, `.` and `-`: nothing that can break out of a Redis key
(`:`, `{}` hash tags, spaces) or needs escaping anywhere. Names of dots only (`.`, `..`) are refused:
they are path segments that URL handling rewrites, so `/rooms/../messages` could never name them.
"""

from __future__ import annotations

import re

ROOM_RE = re.compile(r"(?!\.+\Z)[A-Za-z0-9_.\-]{1,64}")
ROOM_RULE = "room: 1-64 characters of A-Z a-z 0-9 _ . - (not only dots)"


def valid_room(name: object) -> bool:
    return isinstance(name, str) and ROOM_RE.fullmatch(name) is not None
