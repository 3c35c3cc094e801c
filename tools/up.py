"""`roomcast up` (what `make run` runs) and `roomcast down` (`make stop`).

`up` brings the whole cluster up on this machine, in the foreground, one step per function:

  claim the data folder -> plan (reuse what answers, start the rest) -> check ports -> install
  missing OS packages -> Kafka broker(s) -> Redis -> MySQL -> migrate, topic -> persister,
  sweeper, gateways -> HAProxy in front of them -> print where to connect -> watch (and add a
  gateway when `roomcast gateway add` asks) -> stop in order.

Services and infrastructure run as our direct children (tools.localstack, tools.services), each
with a pidfile in <data>/pids so `roomcast down` can stop them from another shell. Only what we
started is ever stopped: a broker, Redis or MySQL that already answered is used and left alone.

When a child dies while we run, its log tail is printed. Gateways, the persister and the sweeper
are restarted (they are built to be: clients resume from their cursor, the persister replays from
its applied mark), up to MAX_RESTARTS within RESTART_WINDOW_S; a crash loop, or the death of a
piece of infrastructure, stops everything and `up` exits 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO
from urllib.parse import urlsplit

from aiokafka.errors import KafkaConnectionError

from shared.mysql import MysqlTarget
from shared.settings import Settings
from tools import haproxy, localstack
from tools.localkafka import KafkaCluster
from tools.localstack import LOCALHOST, LocalStackError, Proc
from tools.services import start_gateway, start_persister, start_sweeper, wait_http_ok

LB_PORT = 8000
GATEWAY_PORTS = (8001, 8002)
PERSISTER_METRICS_PORT = 9101
SWEEPER_METRICS_PORT = 9102
REDIS_MAXMEMORY = "512mb"
# Stop order: the front door first (HAProxy stops taking connections: Up.close_front_door; the
# gateways drain their clients through it; HAProxy exits once they have), then the consumers,
# then the infrastructure under them. Services start in the reverse order.
STOP_ORDER = ("gateway", "haproxy", "sweeper", "persister", "kafka", "redis", "mariadb")
APP_KINDS = frozenset({"gateway", "sweeper", "persister"})
STARTED_FRESH = APP_KINDS | {"haproxy"}  # never adopted: one left by an `up` that died is stopped
MAX_RESTARTS, RESTART_WINDOW_S = 3, 60.0
DOWN_TIMEOUT_S = 120.0
ADD_GATEWAY_TIMEOUT_S = 90.0
TOPIC_TIMEOUT_S = 30.0
_LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class UpError(Exception):
    """`up` cannot go on; the message says why and what to do."""


def default_data_dir() -> Path:
    """`.run/` in the repository (editable install) or else in the current directory."""
    repo = Path(__file__).resolve().parent.parent
    return (repo if (repo / "pyproject.toml").is_file() else Path.cwd()) / ".run"


@dataclass(frozen=True)
class UpOptions:
    data_dir: Path
    gateway_ports: tuple[int, ...] = GATEWAY_PORTS
    lb_port: int = LB_PORT
    persister_metrics_port: int = PERSISTER_METRICS_PORT
    sweeper_metrics_port: int = SWEEPER_METRICS_PORT
    kafka_nodes: int = 1  # three: replication factor 3, min ISR 2 (settings.kafka_bootstrap names them all)
    own_redis: bool = True  # False: REDIS_URL names a Redis to use as it is
    redis_maxmemory: str = REDIS_MAXMEMORY
    install: bool = True  # may run apt-get (as root) for a missing redis-server / mariadbd

    @property
    def logs(self) -> Path:
        return self.data_dir / "logs"

    @property
    def pids(self) -> Path:
        return self.data_dir / "pids"

    @property
    def lb(self) -> Path:
        """HAProxy's rendered config and its runtime API's socket."""
        return self.data_dir / "haproxy"


# --------------------------------------------------------------------------- children and pidfiles


def kind_of(role: str) -> str:
    """'gateway-8001' -> 'gateway'."""
    return role.split("-", 1)[0]


def expected_exe(role: str) -> str:
    """The executable name /proc shows for a role's process: stop_pid's guard against reused PIDs."""
    kind = kind_of(role)
    if kind in APP_KINDS:
        return _real_name(sys.executable)
    binary = {"redis": "redis-server", "mariadb": "mariadbd", "kafka": "java"}.get(kind, kind)
    found = localstack.find_binary(binary)
    return _real_name(found) if found else binary  # Debian's redis-server is a link to redis-check-rdb


def _real_name(path: str | Path) -> str:
    return Path(os.path.realpath(path)).name


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _stop_rank(path: Path) -> tuple[int, str]:
    kind = kind_of(path.stem)
    return (STOP_ORDER.index(kind) if kind in STOP_ORDER else len(STOP_ORDER), path.stem)


def role_pidfiles(pids: Path) -> list[Path]:
    """Pidfiles of the children (not `up` itself), in stop order."""
    return sorted((p for p in pids.glob("*.pid") if p.stem != "up"), key=_stop_rank)


def is_up_process(pid: int) -> bool:
    """A live `roomcast up` (checked by its command line: the PID may have been reused)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace").split("\0")
    except OSError:
        return False
    return localstack.pid_alive(pid) and "up" in argv[1:] and any("roomcast" in a or "shared.cli" in a for a in argv)


@dataclass
class Child:
    """A process `up` owns: started by us (`proc`), or adopted from an earlier `up` that died
    without stopping it (pid only)."""

    role: str
    pid: int
    log_path: Path
    proc: Proc | None = None
    restart: Callable[[], Proc] | None = None  # app services only
    restarted_at: list[float] = field(default_factory=list)
    expect: str = ""  # executable name (adopted ones: guards against a reused PID)

    def __post_init__(self) -> None:
        self.expect = self.expect or expected_exe(self.role)

    @classmethod
    def started(cls, role: str, proc: Proc, restart: Callable[[], Proc] | None = None) -> Child:
        return cls(role, proc.pid, proc.log_path, proc, restart)

    @property
    def kind(self) -> str:
        return kind_of(self.role)

    @property
    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.alive
        return localstack.pid_alive(self.pid) and localstack.process_name(self.pid) == self.expect

    @property
    def exit_status(self) -> str:
        rc = self.proc.popen.returncode if self.proc is not None else None
        if rc is None:
            return "exited"
        return f"was killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited with code {rc}"

    def terminate(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """SIGTERM, once: a second one would make a gateway skip its DRAIN_DELAY_S. SIGINT stops a
        gateway without that delay (no load balancer left to wait for); SIGUSR1 soft-stops HAProxy."""
        if self.proc is not None:
            if self.proc.alive:
                self.proc.popen.send_signal(sig)
        elif self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def wait(self, timeout: float) -> None:
        """Wait for the exit after terminate(); SIGKILL when `timeout` passes. Reaps and cleans up."""
        if self.proc is not None:
            try:
                self.proc.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.popen.kill()
            self.proc.stop()  # gone by now: only reaps it
            return
        localstack.stop_pid(self.pid, self.expect, timeout)  # SIGTERM again is harmless for infra

    def stop_timeout(self, settings: Settings) -> float:
        if self.kind == "gateway":
            return settings.drain_delay_s + settings.drain_grace_s + 10
        return self.proc.stop_timeout if self.proc is not None else 30.0


# --------------------------------------------------------------------------- up


@dataclass
class Plan:
    """What `up` starts; everything else answered already and is reused."""

    start_broker: bool = False
    start_redis: bool = False
    start_mysql: bool = False
    reused: list[str] = field(default_factory=list)  # "kafka 127.0.0.1:9092", shown at the end


class Up:
    def __init__(self, settings: Settings, opts: UpOptions, out: IO[str] | None = None) -> None:
        self.settings = settings
        self.opts = opts
        self.out = out or sys.stdout
        self.children: list[Child] = []
        self.plan = Plan()
        self.stop_requested: str | None = None  # the signal's name once one arrived
        self.gateways_wanted = 0  # gateways asked for by `roomcast gateway add` (SIGUSR1), not yet added
        self.gateway_ports = list(opts.gateway_ports)
        self._lock: IO[str] | None = None

    # ----- the whole run

    def run(self) -> int:
        """Start everything, stay until a signal or a fatal failure, then stop everything. Exit code."""
        previous = self._install_signal_handlers()
        try:
            self.claim()
        except UpError as e:
            self.say(f"roomcast up: {e}")
            self._restore_signal_handlers(previous)
            return 1
        code = 0
        try:
            for step in (self.make_plan, self.check_ports, self.install_missing, self.start_broker,
                         self.start_redis, self.start_mysql, self.migrate, self.ensure_topic, self.start_services,
                         self.start_lb):
                if self.stop_requested:
                    self.say(f"{self.stop_requested} received: not starting the rest")
                    return 0
                step()
            self.announce()
            code = self.watch()
        except (UpError, LocalStackError) as e:
            self.say(f"\nroomcast up failed: {e}")
            code = 1
        finally:
            self.stop_all()
            self.release()
            self._restore_signal_handlers(previous)
        return code

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    # ----- signals: the handler only records that one came

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop_requested = self.stop_requested or signal.Signals(signum).name

    def _on_add_gateway(self, signum: int, frame: FrameType | None) -> None:
        self.gateways_wanted += 1

    def _install_signal_handlers(self) -> dict[int, object]:
        previous: dict[int, object] = {}
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, self._on_signal)
        previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, self._on_add_gateway)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict[int, object]) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]

    # ----- step 1: one `up` per data folder

    def claim(self) -> None:
        """Lock <data>/pids/up.pid (released by the kernel even if we are killed -9), write our PID,
        and stop app services (and HAProxy) an earlier `up` left running when it died."""
        self.opts.pids.mkdir(parents=True, exist_ok=True)
        self.opts.logs.mkdir(parents=True, exist_ok=True)
        path = self.opts.pids / "up.pid"
        lock = open(path, "a+")  # held (and locked) for the whole run
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            pid = _read_pid(path)
            raise UpError(f"another `roomcast up` (pid {pid}) is already running with data folder "
                          f"{self.opts.data_dir}; stop it with Ctrl-C there or `make stop` "
                          f"(roomcast down --data-dir {self.opts.data_dir})") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        self._lock = lock
        for pidfile in role_pidfiles(self.opts.pids):
            if kind_of(pidfile.stem) in STARTED_FRESH and localstack.stop_pidfile(pidfile, expected_exe(pidfile.stem)):
                self.say(f"stopped {pidfile.stem}, left running by an earlier `up` that did not stop cleanly")

    def release(self) -> None:
        if self._lock is not None:
            (self.opts.pids / "up.pid").unlink(missing_ok=True)
            self._lock.close()
            self._lock = None

    # ----- step 2: reuse what answers, adopt what an earlier `up` left, start the rest

    def make_plan(self) -> None:
        self._plan_broker()
        self._plan_redis()
        self._plan_mysql()

    def _plan_broker(self) -> None:
        s, plan = self.settings, self.plan
        kafka = _kafka_addresses(s.kafka_bootstrap)
        ours = [self._adopt(f"kafka-{i}", functools.partial(localstack.port_open, h, p))
                for i, (h, p) in enumerate(kafka, start=1)]
        if all(ours):
            self.say(f"kafka  {s.kafka_bootstrap}: our broker(s) from an earlier `up`, adopted")
            return
        for child in filter(None, ours):  # some of our nodes are gone: start them all again together
            self._stop_child(child)
        if any(localstack.port_open(h, p) for h, p in kafka):
            plan.reused.append(f"kafka {s.kafka_bootstrap}")
        elif all(h in _LOCAL_HOSTS for h, _ in kafka):
            plan.start_broker = True
        else:
            raise UpError(f"no Kafka broker answers at {s.kafka_bootstrap} (KAFKA_BOOTSTRAP), and `up` can only "
                          "start one on this machine: start it, or unset KAFKA_BOOTSTRAP")

    def _plan_redis(self) -> None:
        s, plan = self.settings, self.plan
        if not self.opts.own_redis:
            if not _redis_answers(s.redis_url):
                raise UpError(f"REDIS_URL={_redact(s.redis_url)} does not answer PING: start it, or unset "
                              "REDIS_URL to let `up` run its own")
            plan.reused.append(f"redis {_redact(s.redis_url)}")
        elif self._adopt("redis", lambda: _redis_answers(s.redis_url)) is not None:
            self.say(f"redis  {s.redis_url}: our redis-server from an earlier `up`, adopted")
        else:
            plan.start_redis = True

    def _plan_mysql(self) -> None:
        target, plan = MysqlTarget.from_dsn(self.settings.mysql_dsn), self.plan
        where = f"{target.host}:{target.port}"
        if self._adopt("mariadb", lambda: localstack.port_open(target.host, target.port)) is not None:
            self.say(f"mysql  {where}: our MariaDB from an earlier `up`, adopted")
        elif localstack.port_open(target.host, target.port):
            plan.reused.append(f"mysql {where}")
        elif target.host in _LOCAL_HOSTS:
            plan.start_mysql = True
        else:
            raise UpError(f"no MySQL answers at {where} (MYSQL_DSN), and `up` can only start one on this machine")

    def _adopt(self, role: str, answers: Callable[[], bool]) -> Child | None:
        """Our own infrastructure process from an earlier `up` that died without stopping it: keep
        it if it still serves where the settings say; else stop it, so a fresh one can start."""
        pidfile = self.opts.pids / f"{role}.pid"
        pid = _read_pid(pidfile)
        if pid is None:
            return None
        child = Child(role, pid, self.opts.logs / f"{role}.log")
        if not child.alive:
            pidfile.unlink(missing_ok=True)
            return None
        if not answers():
            self.say(f"stopping {role} (pid {pid}) left by an earlier `up`: it does not serve where expected")
            self._stop_child(child)
            return None
        self.children.append(child)
        return child

    # ----- step 3: fail fast on a busy port (before anything is started)

    def check_ports(self) -> None:
        o, plan = self.opts, self.plan
        wanted: list[tuple[int, str]] = [(o.lb_port, "--lb-port")] + [(p, "--gateway-ports") for p in o.gateway_ports]
        wanted += [(o.persister_metrics_port, "--persister-metrics-port"),
                   (o.sweeper_metrics_port, "--sweeper-metrics-port")]
        if plan.start_broker:
            wanted += [(p, "--kafka-port / KAFKA_BOOTSTRAP") for ports in self._kafka_ports() for p in ports]
        if plan.start_redis:
            wanted.append((_redis_port(self.settings.redis_url), "--redis-port"))
        if plan.start_mysql:
            wanted.append((MysqlTarget.from_dsn(self.settings.mysql_dsn).port, "--mysql-port / MYSQL_DSN"))
        busy = [(p, flag) for p, flag in wanted if not _port_free(p)]
        if busy:
            listed = ", ".join(f"{p} (move it with {flag})" for p, flag in busy)
            raise UpError(f"port(s) already in use on {LOCALHOST}: {listed}")

    # ----- step 4: OS packages

    def install_missing(self) -> None:
        """redis-server / mariadbd / haproxy missing: apt-get install them when we are root, else say how."""
        binaries = ["haproxy"] + (["redis-server"] if self.plan.start_redis else []) + (
            ["mariadbd", "mariadb-install-db"] if self.plan.start_mysql else [])
        pkgs = localstack.missing_packages(binaries)
        if not pkgs:
            return
        command = localstack.apt_command(pkgs)
        if self.opts.install and os.geteuid() == 0 and localstack.find_binary("apt-get"):
            self.say(f"installing {' '.join(pkgs)} with apt-get (log {self.opts.logs / 'apt-get.log'}) ...")
            localstack.apt_install(pkgs, self.opts.logs)
            return
        raise UpError(f"{', '.join(pkgs)} missing; install with:\n    {command}\nthen run `make run` again")

    # ----- step 5: Apache Kafka, one node or three (tools/localkafka.py)

    def _kafka_ports(self) -> list[tuple[int, int]]:
        """(client, controller) port of each node: the controller port is the client port + 1."""
        return [(p, p + 1) for _, p in _kafka_addresses(self.settings.kafka_bootstrap)]

    def start_broker(self) -> None:
        if not self.plan.start_broker:
            return
        n = self.opts.kafka_nodes
        base = self.opts.data_dir / "kafka"
        self.say(f"starting Apache Kafka ({n} node{'s' if n > 1 else ''} on {self.settings.kafka_bootstrap}, "
                 f"data {base}; the jars come from Maven Central on first use) ...")
        cluster = KafkaCluster.local(base, self.opts.logs, self._kafka_ports())
        try:
            cluster.start()
        finally:  # own what started, even when another node did not: stop_all stops it
            for node_id, proc in cluster.procs.items():
                if proc.alive:
                    self._own(Child.started(f"kafka-{node_id}", proc))

    # ----- step 6: Redis with AOF on

    def start_redis(self) -> None:
        if not self.plan.start_redis:
            return
        port = _redis_port(self.settings.redis_url)
        self.say(f"starting redis-server ({LOCALHOST}:{port}, AOF everysec, maxmemory {self.opts.redis_maxmemory} "
                 f"noeviction, data {self.opts.data_dir / 'redis'}) ...")
        proc = localstack.start_redis(port, self.opts.data_dir / "redis", self.opts.logs, appendonly=True,
                                      appendfsync="everysec", maxmemory=self.opts.redis_maxmemory)
        self._own(Child.started("redis", proc))

    # ----- step 7: MySQL / MariaDB

    def start_mysql(self) -> None:
        target = MysqlTarget.from_dsn(self.settings.mysql_dsn)
        if self.plan.start_mysql:
            self.say(f"starting MariaDB ({LOCALHOST}:{target.port}, data {self.opts.data_dir / 'mariadb'}) ...")
            proc = localstack.start_mariadb(target.port, self.opts.data_dir / "mariadb", self.opts.logs)
            self._own(Child.started("mariadb", proc))
            _ensure_mysql_user(target)
        try:
            if localstack.ensure_mysql_database(target.host, target.port, target.user, target.password,
                                                target.database):
                self.say(f"created database {target.database!r}")
        except Exception as e:
            raise UpError(f"MySQL at {target.host}:{target.port}: {e}") from e

    # ----- step 8: schema and topic

    def migrate(self) -> None:
        from shared.migrate import migrate

        try:
            applied = asyncio.run(migrate(self.settings.mysql_dsn))
        except Exception as e:
            raise UpError(f"migrating {MysqlTarget.from_dsn(self.settings.mysql_dsn).database!r} failed: {e}") from e
        if applied:
            self.say(f"applied migrations: {', '.join(applied)}")
        if found := earlier_data(self.settings.mysql_dsn):
            self.say(found)

    def ensure_topic(self) -> None:
        """Create the topic, then verify it: an existing one with another partition count would map
        rooms to the wrong partitions."""
        from shared.kafka import ensure_topic
        from tools import ops

        async def create_and_read() -> tuple[int | None, int | None]:
            deadline = time.monotonic() + TOPIC_TIMEOUT_S
            while True:  # a broker just started on old data may need a moment to read its metadata
                try:
                    await asyncio.wait_for(ensure_topic(self.settings), TOPIC_TIMEOUT_S)
                    return await ops.kafka_topic_state(self.settings, timeout_s=10)
                except (KafkaConnectionError, ops.Unreachable):
                    if time.monotonic() > deadline or self.stop_requested:
                        raise
                    await asyncio.sleep(0.5)

        try:
            partitions, retention = asyncio.run(create_and_read())
        except Exception as e:
            raise UpError(f"creating topic {self.settings.kafka_topic!r} on {self.settings.kafka_bootstrap} "
                          f"failed: {e!r}") from e
        status, detail = ops.judge_topic(self.settings.kafka_topic, partitions, retention, self.settings)
        if status == ops.MISCONFIGURED:
            raise UpError(detail)

    # ----- step 9: our services, consumers first, gateways (the front door) last

    def start_services(self) -> None:
        self.say("starting the persister, the sweeper and the gateways ...")
        self._own(Child.started("persister", self._start_persister(), self._start_persister))
        self._own(Child.started("sweeper", self._start_sweeper(), self._start_sweeper))
        for port in self.opts.gateway_ports:
            self._own_gateway(port)

    def _own_gateway(self, port: int) -> Child:
        def start() -> Proc:
            return self._start_gateway(port)

        child = Child.started(f"gateway-{port}", start(), start)
        self._own(child)
        return child

    # Each starts without waiting, then waits for its HTTP endpoint, so that a start that times
    # out stops the process instead of leaving it running unowned.

    def _start_gateway(self, port: int) -> Proc:
        settings = self.settings.model_copy(update={"dev_mode": True})  # the chat page's dev token
        proc = start_gateway(settings, port, self.opts.logs, name=f"gateway-{port}", wait=False)
        return self._ready_or_stop(proc, f"http://{settings.host}:{port}/readyz")

    def _start_persister(self) -> Proc:
        port = self.opts.persister_metrics_port
        proc = start_persister(self.settings, self.opts.logs, METRICS_PORT=str(port))
        return self._ready_or_stop(proc, f"http://{self.settings.host}:{port}/metrics")

    def _start_sweeper(self) -> Proc:
        port = self.opts.sweeper_metrics_port
        proc = start_sweeper(self.settings, self.opts.logs, metrics_port=port)
        return self._ready_or_stop(proc, f"http://{self.settings.host}:{port}/metrics")

    @staticmethod
    def _ready_or_stop(proc: Proc, url: str) -> Proc:
        proc.ports = (urlsplit(url).port or 0,)
        try:
            wait_http_ok(url, proc, timeout=60)
        except BaseException:
            proc.stop(5)
            raise
        return proc

    def _own(self, child: Child) -> None:
        self.children.append(child)
        assert child.proc is not None
        child.proc.write_pidfile(self.opts.pids / f"{child.role}.pid")

    # ----- step 10: HAProxy, the one address clients need (deploy/haproxy/haproxy.cfg)

    def start_lb(self) -> None:
        self.say(f"starting HAProxy on {LOCALHOST}:{self.opts.lb_port} in front of the gateways ...")
        self._own(Child.started("haproxy", self._start_haproxy(), self._start_haproxy))
        admin = haproxy.admin_socket(self.opts.lb)
        try:
            localstack.wait_until(lambda: all(s.status == "UP" for s in haproxy.servers(admin).values()),
                                  "HAProxy's health checks to pass on every gateway", 30)
        except LocalStackError as e:
            raise UpError(f"{e}; HAProxy's log: {self.opts.logs / 'haproxy.log'}") from e

    def _start_haproxy(self) -> Proc:
        """Also how `up` restarts it: the config names every gateway added meanwhile."""
        config = self._write_lb_config()
        return haproxy.start_haproxy(config, self.opts.lb_port, haproxy.admin_socket(self.opts.lb), self.opts.logs)

    def _write_lb_config(self) -> Path:
        self.opts.lb.mkdir(parents=True, exist_ok=True)
        config = self.opts.lb / "haproxy.cfg"
        config.write_text(haproxy.render(self.opts.lb_port, self.gateway_ports, haproxy.admin_socket(self.opts.lb)))
        return config

    # ----- step 11: where to connect

    def announce(self) -> None:
        from shared.auth import mint_token

        s, o = self.settings, self.opts
        token = mint_token(s, "dev")
        lb = f"{LOCALHOST}:{o.lb_port}"
        ours = ", ".join(c.role for c in self.children)
        lines = [
            "",
            "roomcast is ready.",
            f"  chat page   http://{lb}/",
            f"  websocket   ws://{lb}/ws?v=1&token={token}",
            f"              (HAProxy on {o.lb_port}, in front of every gateway: the one address clients need)",
            f"  dev token   {token}",
            f"              (user 'dev', valid {s.token_ttl_s // 3600} h; `roomcast token NAME` mints others)",
            f"  gateways    {'  '.join(f'ws://{s.host}:{p}/ws' for p in self.gateway_ports)}",
            "              (each one directly, for debugging; `roomcast gateway add` adds one)",
            f"  haproxy     config {o.lb / 'haproxy.cfg'}, runtime API {haproxy.admin_socket(o.lb)}",
            f"  kafka       {s.kafka_bootstrap} topic {s.kafka_topic!r}",
            f"  redis       {_redact(s.redis_url)}",
            f"  mysql       {_redact(s.mysql_dsn)}",
            f"  ours        {ours} (stopped on exit)",
        ]
        if self.plan.reused:
            lines.append(f"  reused      {', '.join(self.plan.reused)} (left running on exit)")
        lines += [
            f"  logs        {o.logs}/ (one file per process)",
            f"  metrics     http://{s.host}:{o.persister_metrics_port}/metrics (persister), "
            f"http://{s.host}:{o.sweeper_metrics_port}/metrics (sweeper), /metrics on each gateway",
            "  stop        Ctrl-C here, or `make stop` from another shell",
        ]
        self.say("\n".join(lines))

    # ----- step 12: watch the children until asked to stop

    def watch(self) -> int:
        while not self.stop_requested:
            time.sleep(0.25)
            if self.gateways_wanted:
                self.gateways_wanted -= 1
                self.add_gateway()
            for child in list(self.children):
                if self.stop_requested or child.alive:
                    continue
                if not self._handle_death(child):
                    return 1
        self.say(f"\n{self.stop_requested} received: stopping everything `up` started ...")
        return 0

    def _handle_death(self, child: Child) -> bool:
        """Report a dead child; restart it if it is an app service that is not crash-looping.
        False: give up (everything gets stopped)."""
        self.say(f"\n{child.role} (pid {child.pid}) {child.exit_status}; last lines of {child.log_path}:\n"
                 + _indent(localstack.log_tail(child.log_path, 20)))
        if child.restart is None:
            self.say(f"{child.role} is infrastructure the others depend on: stopping everything")
            return False
        now = time.monotonic()
        child.restarted_at = [t for t in child.restarted_at if now - t < RESTART_WINDOW_S]
        if len(child.restarted_at) >= MAX_RESTARTS:
            self.say(f"{child.role} died {MAX_RESTARTS + 1} times within {RESTART_WINDOW_S:g}s: stopping everything")
            return False
        child.restarted_at.append(now)
        self.say(f"restarting {child.role} ...")
        try:
            proc = child.restart()
        except LocalStackError as e:
            self.say(f"{child.role} could not be restarted: {e}")
            return False
        child.proc, child.pid, child.log_path = proc, proc.pid, proc.log_path
        proc.write_pidfile(self.opts.pids / f"{child.role}.pid")
        self.say(f"{child.role} is back (pid {proc.pid})")
        return True

    def add_gateway(self) -> None:
        """One more gateway (`roomcast gateway add`), on the next free port: started like the
        others, then put into HAProxy's rotation through its runtime API. Nothing else restarts;
        its clients come with new connections (leastconn sends it the next ones)."""
        port = self._next_gateway_port()
        self.say(f"\nadding gateway-{port} ...")
        try:
            child = self._own_gateway(port)
        except LocalStackError as e:
            self.say(f"gateway-{port} could not start: {e}")
            return
        self.gateway_ports.append(port)
        try:
            config = self._write_lb_config()  # a HAProxy restarted later keeps it
            args = haproxy.default_server_args(config.read_text())
            haproxy.add_server(haproxy.admin_socket(self.opts.lb), port, args)
        except (LocalStackError, OSError) as e:
            self.say(f"HAProxy did not take gateway-{port}: {e}; stopping it")
            self.gateway_ports.remove(port)
            self._stop_child(child)
            self._write_lb_config()
            return
        self.say(f"gateway-{port} added: ws://{self.settings.host}:{port}/ws, in HAProxy's rotation once its "
                 "health checks pass")

    def _next_gateway_port(self) -> int:
        o = self.opts
        taken = {o.lb_port, o.persister_metrics_port, o.sweeper_metrics_port, *self.gateway_ports}
        port = max(self.gateway_ports) + 1
        while port in taken or not _port_free(port):
            port += 1
        return port

    # ----- step 13: stop in order

    def stop_all(self) -> None:
        """The front door first (close_front_door), then stage by stage (gateways, HAProxy, sweeper,
        persister, Kafka, Redis, MariaDB); within a stage all are signalled at once (the gateways
        drain in parallel), then each is waited for."""
        front_door_closed = self.close_front_door()
        stages = list(_stages(self.children))
        for stage in stages:
            self.say(f"stopping {', '.join(c.role for c in stage)} ...")
            for child in stage:
                child.terminate(signal.SIGINT if front_door_closed and child.kind == "gateway" else signal.SIGTERM)
            for child in stage:
                self._stop_child(child, signalled=True)
        if stages:
            self.say("stopped everything `up` started." + (
                f" Left running, not ours: {', '.join(self.plan.reused)}." if self.plan.reused else ""))

    def close_front_door(self) -> bool:
        """Soft-stop HAProxy: from now on it refuses new connections but carries the open ones, so
        each client still gets its acks and then its gateway's 1012 (not a cut connection), and no
        reconnect reaches a gateway that is stopping. The gateways need not wait for a health check
        then (SIGINT: no DRAIN_DELAY_S); HAProxy exits once they have closed their clients."""
        doors = [c for c in self.children if c.kind == "haproxy" and c.alive]
        for door in doors:
            self.say(f"closing the front door: HAProxy on {self.opts.lb_port} takes no new connections ...")
            door.terminate(signal.SIGUSR1)
        return bool(doors)

    def _stop_child(self, child: Child, signalled: bool = False) -> None:
        if not signalled:
            child.terminate()
        child.wait(child.stop_timeout(self.settings))
        (self.opts.pids / f"{child.role}.pid").unlink(missing_ok=True)
        with contextlib.suppress(ValueError):
            self.children.remove(child)


def _stages(children: list[Child]) -> Iterator[list[Child]]:
    for kind in STOP_ORDER:
        stage = [c for c in children if c.kind == kind]
        if stage:
            yield stage


# --------------------------------------------------------------------------- down


def down(data_dir: Path, out: IO[str] | None = None, timeout_s: float = DOWN_TIMEOUT_S) -> int:
    """Stop what a `roomcast up` with this data folder started. A running `up` is asked (SIGTERM)
    and does it in order; whatever is left (an `up` that was killed -9) is stopped by pidfile."""
    out = out or sys.stdout
    pids = data_dir / "pids"
    up_pid = _read_pid(pids / "up.pid")
    did = False
    if up_pid is not None and is_up_process(up_pid):
        print(f"asking roomcast up (pid {up_pid}) to stop everything it started ...", file=out, flush=True)
        os.kill(up_pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while localstack.pid_alive(up_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if localstack.pid_alive(up_pid):
            print(f"roomcast up still running after {timeout_s:g}s: killing it", file=out, flush=True)
            os.kill(up_pid, signal.SIGKILL)
        did = True
    for pidfile in role_pidfiles(pids) if pids.is_dir() else []:
        pid = _read_pid(pidfile)
        if localstack.stop_pidfile(pidfile, expected_exe(pidfile.stem), timeout=30):
            print(f"stopped {pidfile.stem} (pid {pid})", file=out, flush=True)
            did = True
    if up_pid is not None and not localstack.pid_alive(up_pid):
        (pids / "up.pid").unlink(missing_ok=True)
    print("everything is stopped" if did else f"nothing to stop ({data_dir})", file=out, flush=True)
    return 0


# --------------------------------------------------------------------------- gateway add


def request_gateway(data_dir: Path, out: IO[str] | None = None, timeout_s: float = ADD_GATEWAY_TIMEOUT_S) -> int:
    """`roomcast gateway add`: ask the `roomcast up` of this data folder for one more gateway
    (SIGUSR1: `up` starts it and registers it with HAProxy), and wait until HAProxy sends it clients."""
    out = out or sys.stdout
    pids = data_dir / "pids"
    up_pid = _read_pid(pids / "up.pid")
    if up_pid is None or not is_up_process(up_pid):
        print(f"no `roomcast up` is running with data folder {data_dir}: start one first (make run)", file=out)
        return 1
    before = set(pids.glob("gateway-*.pid"))
    os.kill(up_pid, signal.SIGUSR1)
    admin = haproxy.admin_socket(UpOptions(data_dir).lb)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and is_up_process(up_pid):
        for pidfile in set(pids.glob("gateway-*.pid")) - before:
            port = int(pidfile.stem.rpartition("-")[2])
            with contextlib.suppress(OSError, KeyError):
                if haproxy.servers(admin)[haproxy.server_name(port)].status == "UP":
                    print(f"gateway-{port} is in HAProxy's rotation (ws://{LOCALHOST}:{port}/ws directly)", file=out)
                    return 0
        time.sleep(0.2)
    print(f"no new gateway in HAProxy's rotation after {timeout_s:g}s: the `roomcast up` console says why", file=out)
    return 1


# --------------------------------------------------------------------------- helpers


def _kafka_addresses(bootstrap: str) -> list[tuple[str, int]]:
    out = []
    for item in bootstrap.split(","):
        host, _, port = item.strip().rpartition(":")
        out.append((host.strip("[]") or LOCALHOST, int(port or 9092)))
    return out


def _port_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:port. SO_REUSEADDR, like the servers themselves: connections
    of an earlier run still in TIME_WAIT do not keep a server from binding."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((LOCALHOST, port))
        except OSError:
            return False
        return True


def _redis_port(url: str) -> int:
    return urlsplit(url).port or 6379


def _redis_answers(url: str) -> bool:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


EARLIER_DATA_COUNTED = 10_000  # rows counted at most per table: a big archive is not scanned


def earlier_data(dsn: str) -> str | None:
    """What earlier runs left in the database, said at start-up (so a "fresh" cluster that shows
    old rooms is no surprise), with how to start from an empty one; None when it holds no room."""
    target = MysqlTarget.from_dsn(dsn)
    conn = localstack.mysql_connect(target.host, target.port, target.user, target.password,
                                    database=target.database)
    try:
        with conn.cursor() as cur:
            counts = []
            for table in ("rooms", "messages"):
                cur.execute(f"SELECT COUNT(*) FROM (SELECT 1 FROM {table} LIMIT %s) t", (EARLIER_DATA_COUNTED + 1,))
                (n,) = cur.fetchone()
                counts.append(f"{EARLIER_DATA_COUNTED:,}+" if n > EARLIER_DATA_COUNTED else f"{n:,}")
    finally:
        conn.close()
    if counts[0] == "0":
        return None
    fresh = urlsplit(dsn)._replace(path=f"/{target.database}_fresh").geturl()
    return (f"mysql  database {target.database!r} holds {counts[0]} rooms and {counts[1]} archived messages "
            f"from earlier runs (history shows them); for an empty one: MYSQL_DSN={_redact(fresh)} make run")


def _redact(url: str) -> str:
    from tools.ops import redact

    return redact(url)


def _ensure_mysql_user(target: MysqlTarget) -> None:
    """Our fresh MariaDB has only root without a password: create the DSN's user if it is another."""
    if target.user == "root":
        if target.password:
            raise UpError("the MariaDB `up` starts has root without a password; use MYSQL_DSN="
                          f"mysql://root:@{target.host}:{target.port}/{target.database} or a non-root user")
        return
    conn = localstack.mysql_connect(LOCALHOST, target.port)
    try:
        with conn.cursor() as cur:
            for host in ("127.0.0.1", "localhost"):
                cur.execute("CREATE USER IF NOT EXISTS %s@%s IDENTIFIED BY %s", (target.user, host, target.password))
                cur.execute(f"GRANT ALL ON `{target.database.replace('`', '')}`.* TO %s@%s", (target.user, host))
        conn.commit()
    finally:
        conn.close()


def _indent(text: str) -> str:
    return "\n".join(f"    {line}" for line in text.strip("\n").splitlines()) or "    (empty log)"
