"""MySQL connection settings and pools (aiomysql)."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlparse

import aiomysql


@dataclass(frozen=True)
class MysqlTarget:
    host: str
    port: int
    user: str
    password: str
    database: str

    @classmethod
    def from_dsn(cls, dsn: str) -> MysqlTarget:
        """`mysql://user:password@host:port/database`."""
        u = urlparse(dsn)
        if u.scheme not in ("mysql", "mariadb") or not u.path.strip("/"):
            raise ValueError(f"MYSQL_DSN must look like mysql://user:pass@host:3306/db, got {dsn!r}")
        return cls(u.hostname or "127.0.0.1", u.port or 3306, unquote(u.username or "root"),
                   unquote(u.password or ""), u.path.strip("/"))

    def connect_kwargs(self, with_db: bool = True) -> dict[str, object]:
        kw: dict[str, object] = dict(host=self.host, port=self.port, user=self.user,
                                     password=self.password, charset="utf8mb4", autocommit=True)
        if with_db:
            kw["db"] = self.database
        return kw


async def create_pool(dsn: str, maxsize: int = 10, minsize: int = 0) -> aiomysql.Pool:
    """Connections are opened on first use (minsize 0), so a service starts while MySQL is away."""
    target = MysqlTarget.from_dsn(dsn)
    return await aiomysql.create_pool(minsize=minsize, maxsize=maxsize, pool_recycle=3600,
                                      connect_timeout=5, **target.connect_kwargs())


async def ensure_database(dsn: str) -> None:
    target = MysqlTarget.from_dsn(dsn)
    conn = await aiomysql.connect(connect_timeout=5, **target.connect_kwargs(with_db=False))
    try:
        async with conn.cursor() as cur:
            await cur.execute(f"SHOW DATABASES LIKE '{target.database.replace(chr(39), '')}'")
            if await cur.fetchone():
                return
            await cur.execute(
                f"CREATE DATABASE IF NOT EXISTS `{target.database.replace('`', '')}` "
                "CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
            )
    finally:
        conn.close()
