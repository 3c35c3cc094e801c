"""MySQL `rooms` rows: every room gets an auto-increment id the first time it is stored."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import aiomysql


class RoomDirectory:
    """Room name -> MySQL id, registering unknown names in one multi-row insert."""

    def __init__(self, pool: aiomysql.Pool, max_cached: int = 100_000,
                 clock: Callable[[], float] = time.time) -> None:
        self._pool = pool
        self._ids: dict[str, int] = {}
        self._max = max_cached
        self._clock = clock  # stamps created_at (a simulation passes its own)

    async def ids(self, names: Iterable[str]) -> dict[str, int]:
        wanted = set(names)
        missing = [n for n in wanted if n not in self._ids]
        if missing:
            if len(self._ids) + len(missing) > self._max:
                self._ids.clear()
            now = int(self._clock() * 1000)
            async with self._pool.acquire() as conn, conn.cursor() as cur:
                await cur.executemany(
                    "INSERT INTO rooms (name, created_at, last_message_at) VALUES (%s, %s, %s) "
                    "ON DUPLICATE KEY UPDATE name = name",
                    [(n, now, now) for n in missing],
                )
                await cur.execute(
                    "SELECT name, id FROM rooms WHERE name IN (" + ",".join(["%s"] * len(missing)) + ")",
                    missing,
                )
                self._ids.update({name: int(rid) for name, rid in await cur.fetchall()})
        return {n: self._ids[n] for n in wanted}

    def remember(self, ids: dict[str, int]) -> None:
        """Prime the cache with ids already read (the sweeper walks `rooms` anyway)."""
        if len(self._ids) + len(ids) > self._max:
            self._ids.clear()
        self._ids.update(ids)

    async def id(self, name: str) -> int:
        return (await self.ids([name]))[name]

