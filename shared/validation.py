"""Names that reach Redis keys and SQL: room syntax is checked once, here."""

from __future__ import annotations

import re

ROOM_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def valid_room(name: object) -> bool:
    return isinstance(name, str) and ROOM_RE.fullmatch(name) is not None
