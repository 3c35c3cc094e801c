"""Versioned schema migrations: shared/schema/NNNN_name.sql, applied in order, once each."""

from __future__ import annotations

from importlib import resources

import aiomysql

from shared.mysql import MysqlTarget, ensure_database


def migration_files() -> list[tuple[int, str, str]]:
    """[(version, name, sql)] sorted by version."""
    out = []
    for f in resources.files("shared.schema").iterdir():
        if f.name.endswith(".sql"):
            version = int(f.name.split("_", 1)[0])
            out.append((version, f.name, f.read_text()))
    return sorted(out)


def statements(sql: str) -> list[str]:
    lines = [ln for ln in sql.splitlines() if not ln.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


async def migrate(dsn: str) -> list[str]:
    """Create the database if missing and apply pending migrations; returns the applied names."""
    await ensure_database(dsn)
    conn = await aiomysql.connect(connect_timeout=5, **MysqlTarget.from_dsn(dsn).connect_kwargs())
    applied: list[str] = []
    try:
        async with conn.cursor() as cur:
            await cur.execute("SHOW TABLES LIKE 'schema_migrations'")
            if not await cur.fetchone():
                await cur.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations (version INT PRIMARY KEY, "
                    "name VARCHAR(255) NOT NULL, applied_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP)"
                )
            # One migrator at a time (a k8s Job and a developer may race).
            await cur.execute("SELECT GET_LOCK('roomcast_migrate', 30)")
            try:
                await cur.execute("SELECT version FROM schema_migrations")
                done = {row[0] for row in await cur.fetchall()}
                for version, name, sql in migration_files():
                    if version in done:
                        continue
                    for stmt in statements(sql):
                        await cur.execute(stmt)
                    await cur.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (version, name)
                    )
                    applied.append(name)
            finally:
                await cur.execute("SELECT RELEASE_LOCK('roomcast_migrate')")
    finally:
        conn.close()
    return applied
