"""initContainer of every roomcast service: wait until the migrate Job has brought MySQL's schema up
to the migrations shipped in this image, so a new version never runs against an old schema.

Runs in the roomcast image (`python /opt/roomcast-init/wait_for_schema.py [TIMEOUT_S]`), reads
MYSQL_DSN like the services do, never changes anything. Exit 0: schema current; 1: timed out (the
kubelet restarts the initContainer with back-off, and the pod stays not-ready meanwhile).
"""

from __future__ import annotations

import asyncio
import sys
import time

import aiomysql

from shared.migrate import migration_files
from shared.mysql import MysqlTarget
from shared.settings import Settings


async def applied_versions(target: MysqlTarget) -> set[int]:
    conn = await aiomysql.connect(connect_timeout=5, **target.connect_kwargs())
    try:
        async with conn.cursor() as cur:
            await cur.execute("SELECT version FROM schema_migrations")
            return {int(row[0]) for row in await cur.fetchall()}
    finally:
        conn.close()


async def wait(timeout_s: float, interval_s: float = 3.0) -> int:
    target = MysqlTarget.from_dsn(Settings().mysql_dsn)
    wanted = {version for version, _, _ in migration_files()}
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            missing = sorted(wanted - await applied_versions(target))
            if not missing:
                print(f"schema is current ({len(wanted)} migrations) on {target.host}:{target.port}/{target.database}")
                return 0
            reason = f"migrations not applied yet: {missing} (is the roomcast-migrate Job done?)"
        except Exception as exc:  # MySQL not up, database or table not created yet: keep waiting
            reason = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            print(f"gave up after {timeout_s:.0f}s: {reason}", file=sys.stderr)
            return 1
        print(f"waiting for schema: {reason}", flush=True)
        await asyncio.sleep(interval_s)


if __name__ == "__main__":
    sys.exit(asyncio.run(wait(float(sys.argv[1]) if len(sys.argv) > 1 else 600.0)))
