"""`roomcast up` (what `make run` runs) end to end, beside any real `make run`: every port moved to a
free one, its own data folder, its own Redis and Apache Kafka broker, the session's MySQL with a
database of its own. A message sent on one gateway arrives on the other; HAProxy serves the chat
page and the WebSocket on one port; `roomcast gateway add` puts a third gateway into its rotation
while the rest keeps running; SIGTERM (or `roomcast down` from another shell) stops every process
`up` started, and a client connected through HAProxy gets its gateway's 1012."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pymysql
import pytest

from shared.mysql import MysqlTarget
from tests.conftest import ROOT
from tests.support import Peer
from tools import haproxy, localstack

pytestmark = pytest.mark.timeout(120)

READY_TIMEOUT_S = 60
STOP_TIMEOUT_S = 45


@dataclass
class UpRun:
    """A `roomcast up` subprocess and what it printed."""

    proc: subprocess.Popen[str]
    data_dir: Path
    gateway_ports: tuple[int, int]
    lb_port: int
    ports: list[int]  # every port it was told to serve on
    lines: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)

    def read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if "roomcast is ready" in line:
                self.ready.set()
        self.ready.set()  # exited: nothing more will come

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_ready(self) -> None:
        assert self.ready.wait(READY_TIMEOUT_S), f"`up` not ready in {READY_TIMEOUT_S}s:\n{self.output}"
        time.sleep(0.2)  # the lines after "ready" (the token) follow in the same write
        assert self.proc.poll() is None, f"`up` exited ({self.proc.returncode}):\n{self.output}"

    def token(self) -> str:
        [line] = [ln for ln in self.lines if "/ws?v=1&token=" in ln]
        return line.rsplit("token=", 1)[1].strip()

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)


def test_up_refuses_a_busy_port_before_starting_anything(tmp_path: Path) -> None:
    port = next(p for p in localstack.free_ports(20) if localstack.port_bindable(p + 1))
    with socket.socket() as first, socket.socket() as second:
        for sock, p in ((first, port), (second, port + 1)):
            sock.bind(("127.0.0.1", p))
            sock.listen()
        # --gateways 2: the second gateway's port is the next one
        r = subprocess.run(up_command(tmp_path / "run", "--gateway-ports", str(port), "--gateways", "2",
                                      "--lb-port", str(localstack.free_port()), "--no-install"),
                           cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"{port} (move it with --gateway-ports), {port + 1} (move it with --gateway-ports)" in r.stdout, r.stdout
    assert "starting" not in r.stdout, r.stdout
    assert not list((tmp_path / "run" / "pids").glob("*.pid"))


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=STOP_TIMEOUT_S + 10)


def up_command(data_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "shared.cli", "up", "--data-dir", str(data_dir), *extra]


@pytest.fixture
def database(mysql_server_dsn: str) -> Iterator[str]:
    """MYSQL_DSN of a database of this test's own on the machine's MySQL; dropped afterwards."""
    name = f"rc_up_{uuid.uuid4().hex[:10]}"
    yield f"{mysql_server_dsn}/{name}"
    t = MysqlTarget.from_dsn(f"{mysql_server_dsn}/{name}")
    conn = pymysql.connect(host=t.host, port=t.port, user=t.user, password=t.password)
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    conn.close()


@pytest.fixture
def up(tmp_path: Path, database: str) -> Iterator[UpRun]:
    gateways = (localstack.free_port(), localstack.free_port())
    redis, persister, sweeper, lb = localstack.free_ports(4)
    kafka = next(p for p in localstack.free_ports(20) if localstack.port_bindable(p + 1))  # + its controller
    env = {**os.environ, "MYSQL_DSN": database, "LOG_JSON": "false"}
    for name in ("REDIS_URL", "KAFKA_BOOTSTRAP"):  # `up` starts its own on the ports below
        env.pop(name, None)
    argv = up_command(
        tmp_path / "run",
        "--gateway-ports", f"{gateways[0]},{gateways[1]}",
        "--lb-port", str(lb),
        "--kafka-port", str(kafka),
        "--redis-port", str(redis),
        "--persister-metrics-port", str(persister),
        "--sweeper-metrics-port", str(sweeper),
        "--no-install",
    )
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    run = UpRun(proc, tmp_path / "run", gateways, lb, [*gateways, lb, kafka, kafka + 1, redis, persister, sweeper])
    reader = threading.Thread(target=run.read, daemon=True)
    reader.start()
    try:
        yield run
    finally:
        if proc.poll() is None:  # the test failed half-way: leave nothing behind
            leftovers = run.descendants()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for p in leftovers:
                if p.is_running():
                    p.kill()
        reader.join(5)
        assert proc.stdout is not None
        proc.stdout.close()


def assert_all_gone(run: UpRun, children: list[psutil.Process]) -> None:
    _, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, f"still running after `up` stopped: {[(p.pid, p.name()) for p in alive]}\n{run.output}"
    assert not list((run.data_dir / "pids").glob("*.pid")), list((run.data_dir / "pids").iterdir())
    busy = [p for p in run.ports if localstack.port_open("127.0.0.1", p)]
    assert not busy, f"ports still answering: {busy}"


async def send_on_one_receive_on_the_other(run: UpRun) -> None:
    token = run.token()
    a = await Peer.connect(f"ws://127.0.0.1:{run.gateway_ports[0]}", token)
    b = await Peer.connect(f"ws://127.0.0.1:{run.gateway_ports[1]}", token)
    try:
        for peer in (a, b):
            assert (await peer.join("lobby"))["type"] == "joined"
        await a.send({"type": "send", "room": "lobby", "client_msg_id": "hello-1", "body": "hello from A"})
        ack = await a.wait_for(lambda f: f["type"] == "ack", timeout=15)
        got = await b.wait_for(lambda f: f["type"] == "message", timeout=15)
        assert (got["id"], got["body"], got["cursor"]) == (ack["id"], "hello from A", ack["cursor"])
    finally:
        await a.close()
        await b.close()


async def test_up_runs_a_cluster_and_sigterm_stops_everything_it_started(up: UpRun) -> None:
    await asyncio.to_thread(up.wait_ready)
    children = up.descendants()
    kinds = sorted(p.name() for p in children)
    assert "java" in kinds and "haproxy" in kinds and len(children) >= 7, kinds  # + redis, 3 services, 2 gateways
    assert "reused      mysql" in up.output  # the machine's MySQL: used, not ours to stop
    ready = up.lines.index("roomcast is ready.")
    assert up.lines[ready + 1] == f"  chat page   http://127.0.0.1:{up.lb_port}/", up.output
    assert up.lines[ready + 2].startswith(f"  websocket   ws://127.0.0.1:{up.lb_port}/ws?v=1&token="), up.output

    await send_on_one_receive_on_the_other(up)
    page = await asyncio.to_thread(http_get, f"http://127.0.0.1:{up.lb_port}/")
    assert "<title>" in page, "the chat page, through HAProxy"
    client = await Peer.connect(f"ws://127.0.0.1:{up.lb_port}", up.token())
    assert (await client.join("lobby"))["type"] == "joined"

    second = await asyncio.to_thread(cli, "up", "--data-dir", str(up.data_dir))
    assert second.returncode == 1 and "already running" in second.stdout, second.stdout + second.stderr

    up.proc.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(up.proc.wait, STOP_TIMEOUT_S)
    assert code == 0, up.output
    assert_all_gone(up, children)
    await asyncio.wait_for(client._reader, 5)
    assert client.closed_code == 1012, "the client got its gateway's close through HAProxy, not a cut"
    stopping = [ln for ln in up.lines if ln.startswith(("stopping ", "closing the front door"))]
    assert stopping[0].startswith("closing the front door: HAProxy"), stopping
    assert stopping[1].startswith("stopping gateway-") and stopping[2] == "stopping haproxy ...", stopping
    assert stopping[-1] == "stopping redis ...", stopping


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return str(r.read().decode())


async def test_a_gateway_added_while_up_runs_joins_haproxys_rotation_and_nothing_restarts(up: UpRun) -> None:
    await asyncio.to_thread(up.wait_ready)
    pids = up.data_dir / "pids"
    running = {p.stem: p.read_text() for p in pids.glob("*.pid") if p.stem != "up"}
    lb = f"ws://127.0.0.1:{up.lb_port}"
    early = [await Peer.connect(lb, up.token()) for _ in range(2)]  # leastconn: one on each gateway
    for peer in early:
        await peer.join("lobby")

    added = await asyncio.to_thread(cli, "gateway", "add", "--data-dir", str(up.data_dir))
    assert added.returncode == 0, added.stdout + added.stderr + up.output
    port = int(re.search(r"gateway-(\d+) is in HAProxy's rotation", added.stdout).group(1))  # type: ignore[union-attr]
    up.ports.append(port)
    assert {p.stem: p.read_text() for p in pids.glob("*.pid") if p.stem in running} == running, "something restarted"
    assert (pids / f"gateway-{port}.pid").exists()

    late = await Peer.connect(lb, up.token())
    admin = haproxy.admin_socket(up.data_dir / "haproxy")
    assert (await asyncio.to_thread(haproxy.servers, admin))[haproxy.server_name(port)].current == 1, \
        "the next connection goes to the new gateway, the one with the fewest"
    await late.join("lobby")
    await early[0].send({"type": "send", "room": "lobby", "client_msg_id": "hi-3", "body": "hello, newcomer"})
    got = await late.wait_for(lambda f: f["type"] == "message", timeout=15)
    assert got["body"] == "hello, newcomer"
    assert all(p.closed_code is None for p in early), "adding a gateway cut a connection"

    children = up.descendants()
    up.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(up.proc.wait, STOP_TIMEOUT_S) == 0, up.output
    assert_all_gone(up, children)
    for peer in [*early, late]:
        await asyncio.wait_for(peer._reader, 5)
        assert peer.closed_code == 1012


async def test_a_killed_gateway_is_restarted_and_roomcast_down_stops_everything(up: UpRun) -> None:
    await asyncio.to_thread(up.wait_ready)
    role = f"gateway-{up.gateway_ports[1]}"
    victim = int((up.data_dir / "pids" / f"{role}.pid").read_text())
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while f"{role} is back" not in up.output:
        assert time.monotonic() < deadline and up.proc.poll() is None, up.output
        await asyncio.sleep(0.1)
    assert f"{role} (pid {victim}) was killed by SIGKILL; last lines of" in up.output
    await send_on_one_receive_on_the_other(up)  # the new gateway-2 serves

    children = up.descendants()
    down = await asyncio.to_thread(cli, "down", "--data-dir", str(up.data_dir))
    assert down.returncode == 0 and "everything is stopped" in down.stdout, down.stdout + down.stderr
    assert up.proc.wait(5) == 0, up.output
    assert_all_gone(up, children)
