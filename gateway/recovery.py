"""Resuming a room from a cursor (placeholder until the lossless issue lands)."""

from __future__ import annotations

from collections.abc import Callable

from gateway.node import Node
from gateway.protocol import Err
from gateway.session import Session


async def resume(node: Node, session: Session, room: str, cursor: str, fail: Callable[..., None]) -> None:
    fail(Err.UNAVAILABLE, "resume is not available yet")
