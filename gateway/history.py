"""History pages (placeholder until the history issue lands)."""

from __future__ import annotations

from collections.abc import Callable

from gateway.node import Node
from gateway.protocol import Err


async def history_frame(node: Node, room: str, before: str | None, limit: int | None,
                        fail: Callable[..., None]) -> str:
    fail(Err.UNAVAILABLE, "history is not available yet")
    return ""
