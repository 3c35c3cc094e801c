"""tools.localstack against the real binaries: redis-server, mariadbd (Kafka: test_localkafka.py).

Every server runs on free ports in a temporary folder, so these tests can run beside a
`make run` cluster and the machine's shared Redis (6379) / MariaDB (3306), which they never touch.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pymysql
import pytest
import redis

from tools import localstack as ls


@pytest.fixture
def procs() -> Iterator[list[ls.Proc]]:
    """Processes a test starts: stopped afterwards; then no child of ours may be left running."""
    me = psutil.Process()
    before = {c.pid for c in me.children(recursive=True)}
    started: list[ls.Proc] = []
    yield started
    for p in reversed(started):
        p.stop(timeout=10)
    left = [c for c in me.children(recursive=True) if c.pid not in before and c.status() != "zombie"]
    assert not left, f"processes left running: {[(c.pid, c.name()) for c in left]}"


# ----------------------------------------------------------------------------- helpers


def test_wait_port_reports_exit_with_log_tail(tmp_path: Path, procs: list[ls.Proc]) -> None:
    p = ls.start_process("boom", ["sh", "-c", "echo it went boom; exit 3"], tmp_path)
    procs.append(p)
    with pytest.raises(ls.LocalStackError, match=r"(?s)exited with code 3.*it went boom"):
        ls.wait_port(ls.LOCALHOST, ls.free_port(), timeout=10, proc=p)
    assert p.stop() == 3 and p.stop() == 3  # stopping twice is fine


def test_wait_port_times_out(tmp_path: Path, procs: list[ls.Proc]) -> None:
    p = ls.start_process("sleeper", ["sleep", "30"], tmp_path)
    procs.append(p)
    with pytest.raises(ls.LocalStackError, match="timed out"):
        ls.wait_port(ls.LOCALHOST, ls.free_port(), timeout=0.3, proc=p)
    assert p.alive
    p.kill()
    assert not p.alive and p.kill() == -9


def test_ensure_installed_names_the_apt_command() -> None:
    assert ls.ensure_installed(["redis-server", "mariadbd", "mariadb-install-db"]) is None
    cmd = ls.ensure_installed(["no-such-binary-rc", "redis-server", "no-such-binary-rc"])
    assert cmd is not None and cmd.endswith("apt-get install -y no-such-binary-rc")
    assert ls.missing_packages(["no-such-mariadbd"]) == ["no-such-mariadbd"]


# ----------------------------------------------------------------------------- Redis


@pytest.mark.faults
def test_redis_aof_survives_sigkill(tmp_path: Path, procs: list[ls.Proc]) -> None:
    port = ls.free_port()
    data = tmp_path / "redis"
    proc = ls.start_redis(port, data, tmp_path / "log", maxmemory="64mb")
    procs.append(proc)
    client = redis.Redis(host=ls.LOCALHOST, port=port)
    try:
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("save") == {"save": ""}
        client.set("k", "v1")
        client.rpush("buf", *[f"m{i}" for i in range(100)])
        # Written to the AOF before the kill: with everysec, Redis holds writes back (up to 2 s)
        # while a background fsync lags, so on a busy disk the reply can come first.
        deadline = time.monotonic() + 5
        while client.info("persistence")["aof_buffer_length"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.info("persistence")["aof_buffer_length"] == 0
        proc.kill()
        assert not proc.alive

        proc = ls.start_redis(port, data, tmp_path / "log")
        procs.append(proc)
        assert client.get("k") == b"v1"
        assert client.llen("buf") == 100
    finally:
        client.close()
    assert (data / "appendonlydir").is_dir() and not (data / "dump.rdb").exists()


# ----------------------------------------------------------------------------- MariaDB


@pytest.mark.faults
@pytest.mark.timeout(180)
def test_mariadb_datadir_survives_stop_and_kill(tmp_path: Path, procs: list[ls.Proc]) -> None:
    port = ls.free_port()
    data = tmp_path / "mysql"
    proc = ls.start_mariadb(port, data, tmp_path / "log")
    procs.append(proc)
    assert ls.ensure_mysql_database(ls.LOCALHOST, port, "root", "", "roomcast") is True
    assert ls.ensure_mysql_database(ls.LOCALHOST, port, "root", "", "roomcast") is False

    def run(sql: str) -> list[tuple[object, ...]]:
        conn = pymysql.connect(host=ls.LOCALHOST, port=port, user="root", password="", database="roomcast")
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
                rows = list(cur.fetchall())
            conn.commit()
            return rows
        finally:
            conn.close()

    run("CREATE TABLE t (id INT PRIMARY KEY, v VARCHAR(10)) ENGINE=InnoDB")
    run("INSERT INTO t VALUES (1, 'one')")
    assert proc.stop() == 0
    assert not ls.port_open(ls.LOCALHOST, port)

    proc = ls.start_mariadb(port, data, tmp_path / "log")  # reuses the datadir
    procs.append(proc)
    assert run("SELECT v FROM t") == [("one",)]
    run("INSERT INTO t VALUES (2, 'two')")
    proc.kill()  # committed rows survive a kill -9 (InnoDB redo log, flushed at commit)

    proc = ls.start_mariadb(port, data, tmp_path / "log")
    procs.append(proc)
    assert run("SELECT v FROM t ORDER BY id") == [("one",), ("two",)]
