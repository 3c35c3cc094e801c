"""Redis TTLs in simulated time.

The persister's script gives each `sent` key (`SET ... EX dedupe_ttl_s`) and each per-minute
`seen` set (`EXPIRE dedupe_ttl_s` after every batch that adds to it) a TTL that Redis counts in
real seconds. A simulated week passes in minutes, so they would never expire and the dedupe state
of every message ever sent would inflate memory. The simulator therefore deletes them itself
(UNLINK) once the simulated clock passes the moment Redis would have expired them: the tick that
wrote (or last refreshed) the key plus `dedupe_ttl_s`, to the tick. Their real TTLs stay set; they
never fire first while a simulated hour takes less than a real one.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import redis.asyncio as aioredis

UNLINK_BATCH = 500


class Expiry:
    def __init__(self, ttl_s: int) -> None:
        self._ttl_ms = ttl_s * 1000
        self._due: deque[tuple[int, str]] = deque()  # (expires at, key), in the order written
        self._at: dict[str, int] = {}  # key -> when it expires now (a refresh moves it later)
        self.expired = 0

    def touch(self, keys: Iterable[str], now_ms: int) -> None:
        """The keys were written (or their TTL set again) at `now_ms`."""
        at = now_ms + self._ttl_ms
        for key in keys:
            self._at[key] = at
            self._due.append((at, key))

    async def expire(self, redis: aioredis.Redis, now_ms: int) -> int:
        """UNLINK the keys whose TTL has run out by `now_ms`; returns how many."""
        gone = []
        while self._due and self._due[0][0] <= now_ms:
            at, key = self._due.popleft()
            if self._at.get(key) == at:
                del self._at[key]
                gone.append(key)
        for i in range(0, len(gone), UNLINK_BATCH):
            await redis.unlink(*gone[i:i + UNLINK_BATCH])
        self.expired += len(gone)
        return len(gone)
