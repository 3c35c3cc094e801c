"""Issue 18, the security tests a reviewer would still try, against real gateway processes (two,
plus a third to kill), the persister, Kafka, Redis and MariaDB: a user's limits hold across
gateways and outlive a killed one only briefly; tokens bound to an audience and an issuer, and
held to a number of rooms; tokens out of URLs (the subprotocol header, a first frame); floods of
connections that never authenticate; resumes from the start of many rooms at once; and /metrics
only on the port the operator chose.

The module's two gateways have every limit set small; each test uses its own user names.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
import redis.asyncio as aioredis
import websockets
from aiokafka import AIOKafkaProducer
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Subprotocol

from shared.keys import Keys
from shared.message import Message, new_message_id
from shared.migrate import migrate
from shared.settings import Settings
from tests.conftest import ROOT
from tests.support import Cluster, delete_keys, drop_database, eventually, isolated_settings, partition_of, token
from tools import localstack
from tools.services import scrape

pytestmark = pytest.mark.timeout(90)

AUD, ISS = "roomcast-test", "https://issuer.test"
ROOMS_MAX, CONNS_MAX, RATE, BURST, LEASE, GATEWAY_LEASE_S = 20, 3, 5.0, 40, 5, 3.0
AUTH_TIMEOUT_S, UNAUTH_MAX = 1.0, 20
RESUME_BUDGET, RESUME_PER_S = 600, 200.0
V1 = Subprotocol("roomcast.v1")


@pytest.fixture(scope="module")
async def sec(kafka_bootstrap: str, redis_url: str, mysql_server_dsn: str) -> AsyncIterator[Settings]:
    s = isolated_settings(
        kafka_bootstrap, redis_url, mysql_server_dsn,
        jwt_audience=AUD, jwt_issuer=ISS, token_max_rooms=ROOMS_MAX, max_conns_per_user=CONNS_MAX,
        send_rate_per_s=RATE, send_burst=BURST, send_lease=LEASE, gateway_lease_s=GATEWAY_LEASE_S,
        auth_timeout_s=AUTH_TIMEOUT_S, max_unauthenticated=UNAUTH_MAX, resume_budget=RESUME_BUDGET,
        resume_budget_per_s=RESUME_PER_S, metrics_public=False,
    )
    await migrate(s.mysql_dsn)
    yield s
    await drop_database(s.mysql_dsn)
    r = aioredis.from_url(s.redis_url)
    await delete_keys(r, s.redis_prefix)
    await r.aclose()


@pytest.fixture(scope="module")
def gws(sec: Settings, log_dir: Path) -> Iterator[tuple[Cluster, list[str]]]:
    """Two gateways, each with a metrics port of its own (their /metrics URLs), and the persister."""
    c = Cluster(sec, log_dir)
    metrics = []
    try:
        for _ in range(2):
            metrics_port = localstack.free_port()
            c.add_gateway(METRICS_PORT=str(metrics_port))
            metrics.append(f"http://127.0.0.1:{metrics_port}/metrics")
        c.start_persister()
        yield c, metrics
    finally:
        c.stop()


async def ws(url: str, tok: str | None = None, *, header: bool = True, **kw: Any) -> ClientConnection:
    """A connection with the token in the Sec-WebSocket-Protocol header (or the query)."""
    if tok is not None and not header:
        return await connect(f"{url}/ws?v=1&token={tok}", **kw)
    offered = [V1, Subprotocol(f"bearer.{tok}")] if tok is not None else [V1]
    return await connect(f"{url}/ws?v=1", subprotocols=kw.pop("subprotocols", offered), **kw)


async def answer(conn: ClientConnection, frame: dict[str, Any], timeout: float = 5) -> dict[str, Any]:
    """Send a frame, return the next one that is not a message."""
    await conn.send(orjson.dumps(frame).decode())
    async with asyncio.timeout(timeout):
        while (f := orjson.loads(await conn.recv()))["type"] == "message":
            pass
    return f  # type: ignore[no-any-return]


async def closed_by_server(conn: ClientConnection, timeout: float = 5) -> tuple[int | None, str | None]:
    with pytest.raises(websockets.ConnectionClosed):
        async with asyncio.timeout(timeout):
            while True:
                await conn.recv()
    return conn.close_code, conn.close_reason


async def refused(url: str, tok: str | None, **kw: Any) -> tuple[int | None, str | None]:
    async with await ws(url, tok, **kw) as conn:
        return await closed_by_server(conn)


# --- tokens: where they travel

async def test_a_token_in_the_subprotocol_header_and_the_selected_subprotocol_echoed(
        gws: tuple[Cluster, list[str]], sec: Settings) -> None:
    url = gws[0].url(0)
    tok = token(sec, "hd-ann")
    async with await ws(url, tok) as conn:
        # RFC 6455: the server selects one offered subprotocol and echoes it, never the token.
        assert conn.subprotocol == "roomcast.v1"
        assert conn.response is not None and conn.response.headers.get_all("Sec-WebSocket-Protocol") == ["roomcast.v1"]
        assert await answer(conn, {"type": "ping"}) == {"type": "pong"}
        assert (await answer(conn, {"type": "send", "room": "hd", "client_msg_id": "h1", "body": "x"}))["type"] == "ack"
    offered = [Subprotocol(f"bearer.{tok}"), Subprotocol("chat.other"), V1]  # any order, with others
    async with await ws(url, subprotocols=offered) as conn:
        assert conn.subprotocol == "roomcast.v1"
        assert await answer(conn, {"type": "ping"}) == {"type": "pong"}
    code, reason = await refused(url, tok + "x")  # refused after the handshake, so the client reads why
    assert code == 1008 and reason and reason.startswith("bad token"), reason
    code, reason = await refused(url, None, subprotocols=[Subprotocol(f"bearer.{tok}")])
    assert (code, reason) == (1008, "a token in the subprotocols needs the subprotocol roomcast.v1 offered too")
    # The query string still works, with or without the subprotocol.
    async with await ws(url, tok, header=False) as conn:
        assert conn.subprotocol is None
        assert await answer(conn, {"type": "ping"}) == {"type": "pong"}
    async with await ws(url, tok, header=False, subprotocols=[V1]) as conn:
        assert conn.subprotocol == "roomcast.v1"
        assert await answer(conn, {"type": "ping"}) == {"type": "pong"}


async def test_a_token_in_the_first_frame(gws: tuple[Cluster, list[str]], sec: Settings) -> None:
    url = gws[0].url(0)
    tok = token(sec, "ff-bo")
    for offered in ([V1], None):
        async with await ws(url, subprotocols=offered) as conn:
            assert conn.subprotocol == (offered[0] if offered else None)
            await conn.send(orjson.dumps({"type": "auth", "token": tok}).decode())
            assert await answer(conn, {"type": "ping"}) == {"type": "pong"}
            assert (await answer(conn, {"type": "join", "room": "ff"}))["type"] == "joined"
            # once authenticated, another auth frame is just a frame this protocol does not know
            assert (await answer(conn, {"type": "auth", "token": tok}))["code"] == "unknown_type"
    async with await ws(url) as conn:
        await conn.send('{"type":"ping"}')
        assert await closed_by_server(conn) == (1008, 'the first frame must be an auth frame with the token')
    async with await ws(url) as conn:
        await conn.send(orjson.dumps({"type": "auth", "token": tok + "x"}).decode())
        code, reason = await closed_by_server(conn)
        assert code == 1008 and reason and reason.startswith("bad token"), reason
    async with await ws(url) as conn:
        t0 = time.monotonic()
        assert await closed_by_server(conn) == (1008, f"no auth frame within {AUTH_TIMEOUT_S:g} s")
        assert AUTH_TIMEOUT_S - 0.1 <= time.monotonic() - t0 <= AUTH_TIMEOUT_S + 1.5


# --- floods

# Runs in its own process (its CPU does not disturb the measuring client): holds connections that
# never authenticate, for --seconds, at a bounded concurrency: WebSockets that send no auth frame,
# TCP connections that send half an HTTP request (slowloris) or nothing, and handshakes with bad
# tokens. Prints "flooding" once every kind is in flight, then one JSON line of what the server did.
UNAUTHENTICATED_FLOOD = r"""
import asyncio, socket, sys, time
import orjson
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

async def main(host, port, seconds):
    url = f"ws://{host}:{port}/ws?v=1"
    c = {"ws": {}, "ws_open_s": [], "tcp_closed_s": [], "tcp_open_at_end": 0, "bad": {}, "errors": []}
    stop = time.monotonic() + seconds
    started = asyncio.Event()

    def count(d, key):
        d[key] = d.get(key, 0) + 1

    async def no_auth():
        while time.monotonic() < stop:
            try:
                conn = await connect(url, open_timeout=5)
            except Exception as e:
                c["errors"].append(repr(e)[:100]); await asyncio.sleep(0.1); continue
            t0 = time.monotonic()
            try:
                await conn.recv()
            except ConnectionClosed:
                pass
            c["ws_open_s"].append(time.monotonic() - t0)
            count(c["ws"], f"{conn.close_code} {conn.close_reason}")
            started.set()
            await asyncio.sleep(0.1)

    async def tcp(half):
        while time.monotonic() < stop:
            r, w = await asyncio.open_connection(host, port)
            if half:
                w.write(b"GET /ws?v=1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
            t0 = time.monotonic()
            try:
                await asyncio.wait_for(r.read(), stop + 5 - t0)
                c["tcp_closed_s"].append(time.monotonic() - t0)
            except TimeoutError:
                c["tcp_open_at_end"] += 1
            w.close()

    async def bad_token():
        while time.monotonic() < stop:
            async with connect(url, subprotocols=["roomcast.v1", "bearer.not.a.jwt"], open_timeout=5) as conn:
                try:
                    await conn.recv()
                except ConnectionClosed:
                    pass
                count(c["bad"], f"{conn.close_code} {conn.close_reason}")
            await asyncio.sleep(0.05)

    tasks = [no_auth() for _ in range(30)] + [tcp(True) for _ in range(60)] + [tcp(False) for _ in range(60)]
    tasks += [bad_token() for _ in range(5)]
    running = [asyncio.ensure_future(t) for t in tasks]
    await started.wait()
    print("flooding", flush=True)
    await asyncio.gather(*running)
    print(orjson.dumps(c).decode(), flush=True)

asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
"""


async def legit_round(url: str, tok: str, k: int, tag: str) -> tuple[list[float], list[float]]:
    """Connect k times (time to the first pong each), then 30 paced sends (time to each ack: fewer
    than the user's burst, so none is rate limited)."""
    connects, acks = [], []
    for _ in range(k):
        t0 = time.monotonic()
        conn = await ws(url, tok, open_timeout=5)
        assert await answer(conn, {"type": "ping"}) == {"type": "pong"}
        connects.append(time.monotonic() - t0)
        await conn.close()
    async with await ws(url, tok) as conn:
        for i in range(30):
            t0 = time.monotonic()
            f = await answer(conn, {"type": "send", "room": "legit", "client_msg_id": f"{tag}{i}", "body": "x"})
            assert f["type"] == "ack", f
            acks.append(time.monotonic() - t0)
            await asyncio.sleep(0.02)
    return connects, acks


async def test_connections_that_never_authenticate_do_not_hold_the_gateway(
        gws: tuple[Cluster, list[str]], sec: Settings) -> None:
    cluster, metrics = gws
    url, port = cluster.url(1), cluster.gateways[1].ports[0]
    await legit_round(url, token(sec, "fl-warm"), 3, "warm")
    base_connects, base_acks = await legit_round(url, token(sec, "fl-base"), 5, "base")
    flood_s = 4.0
    flooder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", UNAUTHENTICATED_FLOOD, "127.0.0.1", str(port), str(flood_s),
        stdout=asyncio.subprocess.PIPE)
    assert flooder.stdout is not None
    try:
        assert (await asyncio.wait_for(flooder.stdout.readline(), 20)).strip() == b"flooding"
        waiting = scrape(metrics[1])["roomcast_gateway_unauthenticated_connections"]
        flood_connects, flood_acks = await legit_round(url, token(sec, "fl-during"), 5, "flood")
        counts: dict[str, Any] = orjson.loads(await asyncio.wait_for(flooder.stdout.readline(), flood_s + 30))
    finally:
        if flooder.returncode is None:
            flooder.kill()
        await flooder.wait()

    print(f"\nflood: websockets without auth {counts['ws']}, bad tokens {counts['bad']}, "
          f"half or silent TCP closed after max {max(counts['tcp_closed_s']):.2f}s "
          f"({len(counts['tcp_closed_s'])} of them), {waiting:.0f} waiting for an auth frame when sampled")
    print(f"legit connect median {statistics.median(base_connects) * 1000:.1f} -> "
          f"{statistics.median(flood_connects) * 1000:.1f} ms, ack median {statistics.median(base_acks) * 1000:.1f} "
          f"-> {statistics.median(flood_acks) * 1000:.1f} ms")
    assert not counts["errors"], counts["errors"][:3]
    timed_out = f"1008 no auth frame within {AUTH_TIMEOUT_S:g} s"
    too_many = "1013 too many connections waiting to authenticate; try again later"
    assert set(counts["ws"]) == {timed_out, too_many} and counts["ws"][too_many] > 0, counts["ws"]
    assert max(counts["ws_open_s"]) <= AUTH_TIMEOUT_S + 1, "a connection without auth is closed at its deadline"
    assert 0 < waiting <= UNAUTH_MAX
    assert counts["bad"] and all(k.startswith("1008 bad token") for k in counts["bad"]), counts["bad"]
    # Half a request or none: closed at the deadline of the request's head, none left at the end.
    assert counts["tcp_open_at_end"] == 0 and len(counts["tcp_closed_s"]) >= 120
    assert max(counts["tcp_closed_s"]) <= AUTH_TIMEOUT_S + 1
    # Legitimate users meanwhile: every connect and send went through, at about the usual speed.
    assert statistics.median(flood_connects) <= 3 * statistics.median(base_connects) + 0.1
    assert statistics.median(flood_acks) <= 3 * statistics.median(base_acks) + 0.05


# --- tokens: what they must say

def http_status(url: str, headers: dict[str, str] | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return e.code


def claims(sec: Settings, user: str, **extra: Any) -> str:
    now = int(time.time())
    return jwt.encode({"sub": user, "exp": now + 600, "rooms": ["*"], **extra}, sec.jwt_secret.get_secret_value(),
                      algorithm="HS256")


async def test_tokens_must_name_the_audience_and_issuer(gws: tuple[Cluster, list[str]], sec: Settings) -> None:
    url, http = gws[0].url(0), gws[0].http(0)
    wrong = {
        "no aud": {"iss": ISS},
        "another aud": {"aud": "another-service", "iss": ISS},
        "aud list without ours": {"aud": ["a", "b"], "iss": ISS},
        "no iss": {"aud": AUD},
        "another iss": {"aud": AUD, "iss": "https://evil.test"},
        "neither": {},
    }
    for what, extra in wrong.items():
        tok = claims(sec, "au-cy", **extra)
        code, reason = await refused(url, tok)
        assert code == 1008 and reason and reason.startswith("bad token"), (what, reason)
        assert http_status(f"{http}/rooms/au/messages", {"Authorization": f"Bearer {tok}"}) == 401, what
    for tok in (claims(sec, "au-cy", aud=[AUD, "another"], iss=ISS), token(sec, "au-cy")):
        async with await ws(url, tok) as conn:
            assert await answer(conn, {"type": "ping"}) == {"type": "pong"}
    # `roomcast token` mints what the gateways accept when JWT_AUDIENCE / JWT_ISSUER are set.
    cli = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "shared.cli", "token", "au-cli"], cwd=ROOT,
                                  capture_output=True, text=True, timeout=60, env={**os.environ, **sec.to_env()})
    minted = cli.stdout.strip()
    decoded = jwt.decode(minted, sec.jwt_secret.get_secret_value(), algorithms=["HS256"], audience=AUD, issuer=ISS)
    assert (decoded["aud"], decoded["iss"], decoded["sub"]) == (AUD, ISS, "au-cli")
    async with await ws(url, minted) as conn:
        assert await answer(conn, {"type": "ping"}) == {"type": "pong"}


async def test_a_rooms_claim_over_the_limit_is_refused(gws: tuple[Cluster, list[str]], sec: Settings) -> None:
    url, http = gws[0].url(0), gws[0].http(0)
    at_limit = token(sec, "rc-di", rooms=[f"r{i}" for i in range(ROOMS_MAX)])
    async with await ws(url, at_limit) as conn:
        assert (await answer(conn, {"type": "join", "room": f"r{ROOMS_MAX - 1}"}))["type"] == "joined"
    over = token(sec, "rc-di", rooms=[f"r{i}" for i in range(ROOMS_MAX + 1)])
    assert await refused(url, over) == (1008, f"bad token: rooms claim has more than {ROOMS_MAX} entries")
    async with await ws(url) as conn:  # the same through the first frame
        await conn.send(orjson.dumps({"type": "auth", "token": over}).decode())
        assert await closed_by_server(conn) == (1008, f"bad token: rooms claim has more than {ROOMS_MAX} entries")
    assert http_status(f"{http}/rooms/r0/messages", {"Authorization": f"Bearer {over}"}) == 401


# --- limits across gateways

async def test_a_users_connections_and_send_rate_are_limited_across_gateways(
        gws: tuple[Cluster, list[str]], sec: Settings) -> None:
    cluster = gws[0]
    a, b = cluster.url(0), cluster.url(1)
    tok = token(sec, "xg-eve")
    conns = [await ws(a, tok), await ws(a, tok), await ws(b, tok)]
    for conn in conns:
        assert await answer(conn, {"type": "ping"}) == {"type": "pong"}
    for url in (a, b):  # the fourth, on either gateway
        assert await refused(url, tok) == (1013, "too many connections for this user")
    other = await ws(b, token(sec, "xg-fay"))  # another user is not affected
    assert await answer(other, {"type": "ping"}) == {"type": "pong"}
    await other.close()
    await conns.pop(0).close()

    async def one_more_on_b() -> bool:
        conn = await ws(b, tok)
        try:
            ok = await answer(conn, {"type": "ping"}) == {"type": "pong"}
        except websockets.ConnectionClosed:
            return False
        conns.append(conn)
        return ok

    await eventually(one_more_on_b, 5, what="the slot freed on the other gateway")

    # Sends from all three connections (one on A, two on B) as fast as they go: one budget.
    n = BURST + 40
    t0 = time.monotonic()
    for i in range(n):
        await conns[i % 3].send(orjson.dumps({"type": "send", "room": "xg", "client_msg_id": f"s{i}",
                                              "body": "x"}).decode())
    answers: list[dict[str, Any]] = []

    async def read(conn: ClientConnection) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for raw in conn:
                if (f := orjson.loads(raw))["type"] in ("ack", "error"):
                    answers.append(f)

    readers = [asyncio.create_task(read(conn)) for conn in conns]

    async def all_answered() -> bool:
        return len(answers) >= n

    await eventually(all_answered, 10, what="every send answered")
    elapsed = time.monotonic() - t0
    acks = [f for f in answers if f["type"] == "ack"]
    limited = [f for f in answers if f["type"] == "error"]
    assert {f["code"] for f in limited} == {"rate_limited"}
    assert all(1 <= f["retry_after_ms"] <= 1000 / RATE + 1 for f in limited)
    # The bound (gateway/quota.py): the burst, the refill, and what each gateway took unspent. One
    # bucket per gateway would have let both bursts through (2 x 40).
    assert len(acks) <= BURST + RATE * elapsed + 2 * LEASE, (len(acks), elapsed)
    assert len(acks) >= BURST - 2 * LEASE, "no more refused than what the gateways hold unspent"
    print(f"\n{len(acks)} of {n} sends acknowledged across two gateways in {elapsed:.2f}s "
          f"(bound {BURST + RATE * elapsed + 2 * LEASE:.0f}; one bucket per gateway: ~{2 * BURST})")
    for task in readers:
        task.cancel()
    for conn in conns:
        await conn.close()


async def test_a_killed_gateways_connections_stop_counting_within_its_lease(
        gws: tuple[Cluster, list[str]], sec: Settings) -> None:
    cluster = gws[0]
    doomed = cluster.add_gateway()
    tok = token(sec, "kg-gus")
    held = [await ws(f"ws://127.0.0.1:{doomed.ports[0]}", tok) for _ in range(CONNS_MAX)]
    for conn in held:
        assert await answer(conn, {"type": "ping"}) == {"type": "pong"}
    doomed.kill()  # SIGKILL: no shutdown, nothing released
    killed = time.monotonic()
    cluster.gateways.remove(doomed)
    # Its counts outlive it (it renewed them within the last third of its lease)...
    assert await refused(cluster.url(0), tok) == (1013, "too many connections for this user")

    async def admitted() -> bool:
        conn = await ws(cluster.url(0), tok)
        try:
            return await answer(conn, {"type": "ping"}) == {"type": "pong"}
        except websockets.ConnectionClosed:
            return False
        finally:
            await conn.close()

    # ...until the lease runs out, without anyone cleaning up.
    await eventually(admitted, GATEWAY_LEASE_S + 5, every=0.1, what="the killed gateway's connections released")
    gone = time.monotonic() - killed
    print(f"\nthe killed gateway's connections stopped counting after {gone:.1f}s (lease {GATEWAY_LEASE_S:g}s)")
    assert GATEWAY_LEASE_S * 2 / 3 - 0.5 <= gone <= GATEWAY_LEASE_S + 1.5
    for conn in held:
        await conn.close()  # (the peer is gone: the connection is closed already)


# --- resumes

async def produce(settings: Settings, messages: list[Message]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        sent = [await producer.send(settings.kafka_topic, m.kafka_value(), key=m.room.encode(),
                                    partition=partition_of(settings, m.room).partition) for m in messages]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


async def test_resuming_many_rooms_from_the_start_is_bounded_per_connection(
        gws: tuple[Cluster, list[str]], sec: Settings) -> None:
    cluster, metrics_urls = gws
    url, metrics = cluster.url(0), metrics_urls[0]
    rooms, per_room = [f"amp-{i}" for i in range(15)], 100
    await produce(sec, [Message(new_message_id(), room, "seed", f"{room}:{i}", 1_764_000_000_000 + i, f"c{i}")
                        for i in range(per_room) for room in rooms])
    redis, keys = aioredis.from_url(sec.redis_url), Keys(sec.redis_prefix, sec.kafka_partitions)
    try:
        async def stored() -> bool:
            lengths = [await redis.llen(keys.msgs(room)) for room in rooms]  # type: ignore[misc]
            return all(n == per_room for n in lengths)

        await eventually(stored, 30, what="the seeded rooms stored")
    finally:
        await redis.aclose()
    start = {room: f"{partition_of(sec, room).partition}--1" for room in rooms}  # before the first record

    # Another user's latency, before and while one connection asks for every room from the start.
    other = await ws(url, token(sec, "am-ida"))

    async def acks_ms(tag: str) -> list[float]:
        out = []
        for i in range(15):
            t0 = time.monotonic()
            assert (await answer(other, {"type": "send", "room": "am", "client_msg_id": f"{tag}{i}",
                                         "body": "x"}))["type"] == "ack"
            out.append(time.monotonic() - t0)
            await asyncio.sleep(0.02)
        return out

    base = await acks_ms("base")
    read0 = scrape(metrics)["roomcast_gateway_resume_read_entries_total"]
    # (max_queue=None: replays left unread must not hold up the closing handshake)
    flooder = await ws(url, token(sec, "am-jo"), max_size=2**24, max_queue=None)
    running: list[float] = []
    sampling = True

    async def sample() -> None:
        while sampling:
            running.append((await asyncio.to_thread(scrape, metrics))["roomcast_gateway_resumes_running"])
            await asyncio.sleep(0.01)

    sampler = asyncio.create_task(sample())
    t0 = time.monotonic()
    for room in rooms:
        await flooder.send(orjson.dumps({"type": "join", "room": room, "cursor": start[room]}).decode())
    answered: dict[str, dict[str, Any]] = {}
    replayed = 0
    loaded = asyncio.create_task(acks_ms("load"))
    async with asyncio.timeout(20):
        while len(answered) < len(rooms):
            f = orjson.loads(await flooder.recv())
            if f["type"] == "message":
                replayed += 1
            elif f["type"] in ("joined", "error"):
                answered[f.get("room") or f["ref"]] = f
    elapsed = time.monotonic() - t0
    during = await loaded
    sampling = False
    await sampler
    read = scrape(metrics)["roomcast_gateway_resume_read_entries_total"] - read0

    joined = [r for r, f in answered.items() if f["type"] == "joined"]
    limited = [f for f in answered.values() if f["type"] == "error"]
    print(f"\n{len(joined)} of {len(rooms)} rooms resumed ({replayed} messages replayed, {read:.0f} entries read) "
          f"in {elapsed:.2f}s, {len(limited)} answered rate_limited; resumes running at once: max {max(running):.0f} "
          f"of {len(running)} samples; another user's ack median {statistics.median(base) * 1000:.1f} -> "
          f"{statistics.median(during) * 1000:.1f} ms")
    # What one connection made the node read: the budget, its refill, and one resume's worth.
    assert read <= RESUME_BUDGET + RESUME_PER_S * elapsed + per_room, read
    assert replayed == per_room * len(joined) and all(answered[r]["recovered"] for r in joined)
    assert limited and all(f["code"] == "rate_limited" and f["retry_after_ms"] >= 1 for f in limited)
    assert max(running) <= 1, "one resume at a time on that connection (and no other resumed)"
    assert statistics.median(during) <= 3 * statistics.median(base) + 0.05
    # The budget refills: a refused room resumes after the hint; another connection has its own.
    retry = limited[0]
    await asyncio.sleep(retry["retry_after_ms"] / 1000)
    again = await answer(flooder, {"type": "join", "room": retry["ref"], "cursor": start[retry["ref"]]}, 10)
    assert again["type"] == "joined" and again["recovered"], again
    fresh = await ws(url, token(sec, "am-jo"), max_size=2**24, max_queue=None)
    assert (await answer(fresh, {"type": "join", "room": rooms[0], "cursor": start[rooms[0]]}))["type"] == "joined"
    for conn in (other, flooder, fresh):
        await conn.close()


# --- metrics

async def test_metrics_are_served_only_on_the_metrics_port(gws: tuple[Cluster, list[str]]) -> None:
    cluster, metrics = gws
    public, private = cluster.http(0), metrics[0].removesuffix("/metrics")
    assert http_status(f"{public}/metrics") == 404  # METRICS_PUBLIC=false
    assert http_status(f"{public}/healthz") == 200
    assert "roomcast_gateway_connections" in scrape(f"{private}/metrics")
    for path in ("/healthz", "/readyz", "/", "/rooms/x/messages"):  # the metrics port serves nothing else
        assert http_status(f"{private}{path}") == 404, path
    with pytest.raises(websockets.InvalidStatus) as refused_ws:
        await connect(f"{private.replace('http', 'ws', 1)}/ws?v=1")
    assert refused_ws.value.response.status_code == 403
