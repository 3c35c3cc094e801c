"""Start, find and stop the local infrastructure processes (Redis, MariaDB; Kafka: tools.localkafka).

Used by ``make run`` / ``make stop`` and by test fixtures. Plain synchronous code: every
server runs in the foreground as our direct child (never daemonized), so we own its PID and
stop it by PID: SIGTERM, then SIGKILL. Nothing here does I/O at import time.

Each server writes stdout+stderr to ``<log_dir>/<name>.log`` (appended, with a header per
start); a start that fails raises :class:`LocalStackError` carrying the tail of that log.

Start times measured on the 2-core dev machine:

- redis-server: ~0.02 s (stop ~0.11 s).
- MariaDB 10.11, fresh datadir: ``mariadb-install-db`` ~0.5 s + server ready 0.12-0.17 s;
  restart on an existing datadir ~0.12 s, also after a kill -9 (crash recovery is instant here).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOCALHOST = "127.0.0.1"

# Debian package providing each binary we may start.
APT_PACKAGES: dict[str, str] = {
    "redis-server": "redis-server",
    "mariadbd": "mariadb-server",
    "mariadb-install-db": "mariadb-server",
    "mariadb": "mariadb-client",
}

# Server binaries often live in sbin, which a non-root PATH may lack.
_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")


class LocalStackError(RuntimeError):
    """A local infrastructure process could not be found, started or reached."""


# --------------------------------------------------------------------------- ports


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port that is free right now (the kernel's pick; racy by nature, like any such helper)."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = LOCALHOST) -> list[int]:
    """`count` distinct TCP ports that are free right now (held open together while picked)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for s in socks:
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]


def port_bindable(port: int, host: str = LOCALHOST) -> bool:
    """True if nothing is bound to ``host:port`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def port_open(host: str, port: int, timeout: float = 0.25) -> bool:
    """True if a TCP connection to ``host:port`` succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def log_tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file ('' if it does not exist)."""
    try:
        data = path.read_bytes()[-32768:]
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def wait_until(
    check: Callable[[], bool],
    what: str,
    timeout: float,
    proc: Proc | None = None,
    interval: float = 0.02,
) -> None:
    """Poll ``check`` until it returns True.

    Raises :class:`LocalStackError` (with the tail of ``proc``'s log) if ``proc`` exits first
    or ``timeout`` seconds pass. Exceptions raised by ``check`` count as "not yet".
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except Exception:
            pass
        if proc is not None and not proc.alive:
            raise LocalStackError(
                f"{proc.name} (pid {proc.pid}) exited with code {proc.popen.returncode} "
                f"before {what}; log {proc.log_path}:\n{log_tail(proc.log_path)}"
            )
        if time.monotonic() >= deadline:
            tail = f"; log {proc.log_path}:\n{log_tail(proc.log_path)}" if proc is not None else ""
            raise LocalStackError(f"timed out after {timeout:.1f}s waiting for {what}{tail}")
        time.sleep(interval)
        interval = min(interval * 1.5, 0.2)


def require_port_free(*ports: int, host: str = LOCALHOST) -> None:
    """Fail fast if something already answers on a port we are about to serve on (otherwise a
    readiness check could succeed against that other server while ours dies)."""
    busy = [p for p in ports if port_open(host, p)]
    if busy:
        raise LocalStackError(f"port(s) {', '.join(map(str, busy))} on {host} already in use")


def wait_port(host: str, port: int, timeout: float = 30.0, proc: Proc | None = None) -> None:
    """Wait until ``host:port`` accepts TCP connections (see :func:`wait_until` for errors)."""
    wait_until(lambda: port_open(host, port), f"{host}:{port} to accept connections", timeout, proc)


# --------------------------------------------------------------------------- processes


@dataclass
class Proc:
    """A server process we started and own (a direct child, in its own session)."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    stop_timeout: float = 10.0
    ports: tuple[int, ...] = field(default=())
    _gone: bool = field(default=False, repr=False)  # the whole group: its id may be reused after

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float | None = None) -> int:
        """SIGTERM to its process group, wait up to ``timeout`` s (default ``stop_timeout``) for all
        of it, then SIGKILL. The group, not the PID: a wrapper such as `faketime` forks the real
        server, which the wrapper's death would otherwise leave running.

        Safe to call any number of times. Returns the exit code.
        """
        if self._gone:
            return self.popen.wait()
        deadline = time.monotonic() + (self.stop_timeout if timeout is None else timeout)
        if self.popen.poll() is None:
            self._signal_group(signal.SIGTERM)
        while self._group_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.kill()

    def kill(self) -> int:
        """SIGKILL its process group and reap (for fault tests: no shutdown hooks run). Safe to call twice."""
        if not self._gone:
            if self._group_alive():  # (a group gone already is not signalled: its id may be taken again)
                self._signal_group(signal.SIGKILL)
            self.popen.wait()
            deadline = time.monotonic() + 5
            while self._group_alive() and time.monotonic() < deadline:
                time.sleep(0.02)
            self._gone = True
        return self.popen.wait()

    def _signal_group(self, sig: signal.Signals) -> None:
        # (its own session: the group's id is its PID, still reserved while unreaped)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)

    def _group_alive(self) -> bool:
        """Whether a process of its group still runs (a zombie does not: init reaps an orphan's late)."""
        self.popen.poll()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            fields = _stat_fields(stat)  # (state, ppid, pgrp, ...)
            if fields and fields[2] == str(self.popen.pid) and fields[0] != "Z":
                return True
        return False

    def write_pidfile(self, path: Path) -> None:
        """Record the PID so another shell (``make stop``) can stop this process."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{self.pid}\n")

    def __enter__(self) -> Proc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_process(
    name: str,
    argv: Sequence[str],
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    stop_timeout: float = 10.0,
    ports: Iterable[int] = (),
) -> Proc:
    """Start ``argv`` in the background, output appended to ``<log_dir>/<name>.log``.

    The child gets its own session, so a Ctrl-C in the terminal reaches only our orchestrator,
    which then stops the children in order. Extra ``env`` entries are added to ours.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    full_env = {**os.environ, **(env or {})}
    with open(log_path, "ab") as log:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        log.write(f"\n===== {stamp} start {name}: {shlex.join(argv)}\n".encode())
        log.flush()
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )
    return Proc(name=name, popen=popen, log_path=log_path, stop_timeout=stop_timeout, ports=tuple(ports))


def _stat_fields(stat: Path) -> list[str]:
    """The fields of a /proc/<pid>/stat after the command name (state, ppid, pgrp, ...); [] when the
    process is gone."""
    try:
        return stat.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def pid_alive(pid: int) -> bool:
    """True if a process with this PID exists (and is not a zombie)."""
    fields = _stat_fields(Path(f"/proc/{pid}/stat"))
    return bool(fields) and fields[0] != "Z"


def process_name(pid: int) -> str | None:
    """File name of the executable running as ``pid`` (None if there is no such process).

    Read from /proc/<pid>/exe: redis-server rewrites its command line ("redis-server 127.0.0.1:6380").
    """
    try:
        return Path(os.readlink(f"/proc/{pid}/exe")).name.removesuffix(" (deleted)")
    except OSError:
        pass
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    first = raw.split(b"\0", 1)[0].decode("utf-8", "replace").split()
    return Path(first[0]).name if first else None


def stop_pid(pid: int, expect: str, timeout: float = 10.0) -> bool:
    """Stop a process we started from another shell: SIGTERM, wait, then SIGKILL.

    Only signals it if its executable's name is ``expect`` (guards against a reused PID).
    Returns True if such a process was running.
    """
    if process_name(pid) != expect or not pid_alive(pid):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        while pid_alive(pid):
            time.sleep(0.02)
    return True


def stop_pidfile(path: Path, expect: str, timeout: float = 10.0) -> bool:
    """:func:`stop_pid` for the PID recorded in ``path`` (removed afterwards)."""
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return False
    stopped = stop_pid(pid, expect, timeout)
    path.unlink(missing_ok=True)
    return stopped


# --------------------------------------------------------------------------- binaries


def find_binary(name: str) -> Path | None:
    """``name`` on PATH, or in an sbin directory."""
    found = shutil.which(name)
    if found:
        return Path(found)
    for d in _SBIN_DIRS:
        p = Path(d) / name
        if p.is_file() and os.access(p, os.X_OK):
            return p
    return None


def require_binary(name: str) -> Path:
    p = find_binary(name)
    if p is None:
        cmd = ensure_installed([name]) or ""
        raise LocalStackError(f"{name} not found on PATH" + (f"; install it with: {cmd}" if cmd else ""))
    return p


def missing_packages(binaries: Iterable[str]) -> list[str]:
    """OS packages providing the ``binaries`` that are not installed (deduplicated, in order)."""
    pkgs: list[str] = []
    for b in binaries:
        if find_binary(b) is None:
            pkg = APT_PACKAGES.get(b, b)
            if pkg not in pkgs:
                pkgs.append(pkg)
    return pkgs


def apt_command(pkgs: Sequence[str]) -> str:
    """The exact command installing ``pkgs`` (prefixed with sudo when we are not root)."""
    sudo = "" if os.geteuid() == 0 else "sudo "
    return f"{sudo}apt-get install -y {' '.join(pkgs)}"


def ensure_installed(binaries: Iterable[str]) -> str | None:
    """None if every binary is present, else the exact command to install what is missing,
    e.g. ``apt-get install -y redis-server mariadb-server``."""
    pkgs = missing_packages(binaries)
    return apt_command(pkgs) if pkgs else None


def apt_install(pkgs: Sequence[str], log_dir: Path | None = None) -> bool:
    """Install ``pkgs`` with apt-get when we are root and apt-get exists.

    Returns False (doing nothing) otherwise; raises :class:`LocalStackError` if apt-get fails.
    Runs ``apt-get update`` and retries once if the first attempt fails (empty package lists).
    """
    apt = shutil.which("apt-get")
    if not pkgs or os.geteuid() != 0 or apt is None:
        return False
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [apt, "install", "-y", "--no-install-recommends", *pkgs]
    out = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        subprocess.run([apt, "update"], env=env, capture_output=True, check=False)
        out = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(log_dir / "apt-get.log", "a") as f:
            f.write(out.stdout + out.stderr)
    if out.returncode != 0:
        tail = "\n".join((out.stdout + out.stderr).splitlines()[-20:])
        raise LocalStackError(f"{shlex.join(install)} failed (code {out.returncode}):\n{tail}")
    return True


# --------------------------------------------------------------------------- Redis


def redis_ping(port: int, host: str = LOCALHOST, timeout: float = 1.0) -> bool:
    """True if the Redis at ``host:port`` answers PING with PONG (not LOADING)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(
    port: int,
    data_dir: Path,
    log_dir: Path,
    appendonly: bool = True,
    appendfsync: str = "everysec",
    maxmemory: str | None = None,
    timeout: float = 30.0,
    extra_args: Sequence[str] = (),
    name: str = "redis",
) -> Proc:
    """Our own redis-server on 127.0.0.1:``port`` (foreground, so we own its PID).

    No RDB snapshots (``save ""``); AOF in ``data_dir`` when ``appendonly``; never evicts
    (``maxmemory-policy noeviction``): a buffer that is full must refuse writes, not drop data.
    A kill -9 loses nothing that Redis has written to its AOF, which it does before replying
    unless a background fsync lags (then up to 2 s of writes wait in its buffer while it answers);
    ``appendfsync`` bounds the loss on an OS crash / power cut.
    """
    if appendfsync not in ("always", "everysec", "no"):
        raise ValueError(f"appendfsync must be always, everysec or no, not {appendfsync!r}")
    require_port_free(port)
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        str(require_binary("redis-server")),
        "--port",
        str(port),
        "--bind",
        LOCALHOST,
        "--daemonize",
        "no",
        "--dir",
        str(data_dir),
        "--logfile",
        "",
        "--save",
        "",
        "--appendonly",
        "yes" if appendonly else "no",
        "--appendfsync",
        appendfsync,
        "--maxmemory-policy",
        "noeviction",
    ]
    if maxmemory is not None:
        argv += ["--maxmemory", maxmemory]
    proc = start_process(name, [*argv, *extra_args], log_dir, ports=[port])
    _wait_or_stop(proc, lambda: wait_until(lambda: redis_ping(port), f"redis PING on {port}", timeout, proc))
    return proc


def start_redis_cluster(ports: Sequence[tuple[int, int]], data_dir: Path, log_dir: Path, replicas: int = 1,
                        node_timeout_ms: int = 2000, timeout: float = 60.0) -> list[Proc]:
    """A Redis Cluster of our own: one redis-server per (port, cluster bus port) (AOF on, as
    `start_redis`), then `redis-cli --cluster create` with ``replicas`` replicas per primary;
    returns once every node says the cluster is ok and every replica has its primary's data (a
    replica that never synced refuses to fail over). A node started again with
    ``start_redis_cluster_node`` on its folder rejoins it."""
    procs = [start_redis_cluster_node(port, bus, data_dir, log_dir, node_timeout_ms) for port, bus in ports]
    addresses = [port for port, _ in ports]
    try:
        argv = [str(require_binary("redis-cli")), "--cluster", "create",
                *(f"{LOCALHOST}:{p}" for p in addresses), "--cluster-replicas", str(replicas), "--cluster-yes"]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        if out.returncode != 0:
            raise LocalStackError(f"{shlex.join(argv)} failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
        for port in addresses:
            wait_until(lambda port=port: redis_cluster_ok(port), f"redis cluster ok on {port}", timeout)  # type: ignore[misc]
        for port in addresses:
            wait_until(lambda port=port: redis_replica_synced(port), f"redis replica synced on {port}", timeout)  # type: ignore[misc]
    except BaseException:
        for proc in procs:
            proc.stop(5)
        raise
    return procs


def start_redis_cluster_node(port: int, bus_port: int, data_dir: Path, log_dir: Path,
                             node_timeout_ms: int = 2000) -> Proc:
    return start_redis(port, data_dir / str(port), log_dir, name=f"redis-{port}", extra_args=[
        "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-port", str(bus_port),
        "--cluster-node-timeout", str(node_timeout_ms), "--repl-diskless-sync-delay", "0"])


def _redis_info(port: int, command: bytes, host: str = LOCALHOST) -> bytes:
    try:
        with socket.create_connection((host, port), timeout=1) as s:
            s.sendall(command + b"\r\n")
            return s.recv(4096)
    except OSError:
        return b""


def redis_cluster_ok(port: int, host: str = LOCALHOST) -> bool:
    return b"cluster_state:ok" in _redis_info(port, b"CLUSTER INFO", host)


def redis_replica_synced(port: int, host: str = LOCALHOST) -> bool:
    """A primary, or a replica whose link to its primary is up (its first sync done)."""
    info = _redis_info(port, b"INFO replication", host)
    return b"role:master" in info or b"master_link_status:up" in info


# --------------------------------------------------------------------------- MariaDB


def mysql_connect(host: str, port: int, user: str = "root", password: str = "", **kw: Any) -> Any:
    """A pymysql connection (imported lazily: pymysql comes with aiomysql)."""
    import pymysql

    return pymysql.connect(host=host, port=port, user=user, password=password, connect_timeout=2, **kw)


def mariadb_initialised(data_dir: Path) -> bool:
    return (data_dir / "mysql").is_dir() and (data_dir / "ibdata1").is_file()


def init_mariadb(data_dir: Path, log_dir: Path, timeout: float = 120.0) -> None:
    """Create the system tables in an empty ``data_dir`` (root@localhost/127.0.0.1/::1,
    no password). Runs as root via ``--user=root``; takes ~0.6 s here."""
    data_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "mariadb-install-db.log"
    argv = [
        str(require_binary("mariadb-install-db")),
        "--no-defaults",  # must come first; the machine's /etc/mysql config is not ours
        f"--datadir={data_dir}",
        "--user=root",
        "--auth-root-authentication-method=normal",
        "--skip-test-db",
        "--skip-name-resolve",
    ]
    with open(log_path, "ab") as log:
        log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(argv)}\n".encode())
        log.flush()
        try:
            rc = subprocess.run(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired as e:
            raise LocalStackError(f"mariadb-install-db timed out; log {log_path}:\n{log_tail(log_path)}") from e
    if rc != 0 or not mariadb_initialised(data_dir):
        raise LocalStackError(f"mariadb-install-db failed (code {rc}); log {log_path}:\n{log_tail(log_path)}")


def start_mariadb(
    port: int,
    data_dir: Path,
    log_dir: Path,
    extra_args: Sequence[str] = (),
    timeout: float = 120.0,
) -> Proc:
    """Our own mariadbd on 127.0.0.1:``port`` with ``data_dir`` (initialised first if empty;
    an existing datadir is reused, e.g. for a restart). Waits until root with an empty password
    can connect over TCP. Fresh: ~0.75 s in all; restart: ~0.15 s."""
    require_port_free(port)
    if not mariadb_initialised(data_dir):
        init_mariadb(data_dir, log_dir)
    sock = data_dir / "mysqld.sock"
    if len(str(sock)) > 100:  # sun_path is 108 bytes
        sock = Path(f"/tmp/roomcast-mysqld-{port}.sock")
    argv = [
        str(require_binary("mariadbd")),
        "--no-defaults",
        f"--datadir={data_dir}",
        f"--port={port}",
        f"--bind-address={LOCALHOST}",
        f"--socket={sock}",
        f"--pid-file={data_dir / 'mysqld.pid'}",
        "--user=root",
        "--skip-name-resolve",
        "--character-set-server=utf8mb4",
        *extra_args,
    ]
    proc = start_process("mariadb", argv, log_dir, stop_timeout=60.0, ports=[port])

    def can_connect() -> bool:
        conn = mysql_connect(LOCALHOST, port)
        conn.close()
        return True

    _wait_or_stop(proc, lambda: wait_until(can_connect, f"MariaDB on {port} to accept root", timeout, proc))
    return proc


_DB_NAME = re.compile(r"^[A-Za-z0-9_$]{1,64}$")


def ensure_mysql_database(host: str, port: int, user: str, password: str, db: str) -> bool:
    """CREATE DATABASE ``db`` (utf8mb4) if it does not exist. Returns True if it was created."""
    if not _DB_NAME.match(db):
        raise ValueError(f"unsupported database name {db!r}")
    import pymysql

    conn = pymysql.connect(host=host, port=port, user=user, password=password, connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = %s", (db,))
            if cur.fetchone():
                return False
            cur.execute(f"CREATE DATABASE IF NOT EXISTS `{db}` CHARACTER SET utf8mb4")
        conn.commit()
        return True
    finally:
        conn.close()


# --------------------------------------------------------------------------- helpers


def _wait_or_stop(proc: Proc, wait: Callable[[], None]) -> None:
    """Run ``wait``; if it fails, stop ``proc`` before re-raising (no orphan on a failed start)."""
    try:
        wait()
    except BaseException:
        proc.stop(timeout=5)
        raise
