"""Workload `presence`: what presence and typing cost ONE gateway, per connected user and per signal.

    roomcast bench presence --cluster --conns 1000 --rate 5
    roomcast bench presence --url ws://127.0.0.1:8001 --watch gateway=PID --conns 1000

1. baseline: the gateway's CPU over --idle seconds with no client;
2. joins: C connections, each its own user, join one room (W of them with presence events): the
   gateway's CPU per join (handshake, token, join, the presence script, the read-state lookup) and
   the presence_events the watchers got (one per user);
3. idle: the same window with the C users online: the gateway's CPU above the baseline is what
   keeping C users present costs (the refresh of every (room, user) each PRESENCE_TTL_S/4, plus
   WebSocket keepalive), per user; and Redis memory per online user (MEMORY USAGE of the room's keys);
4. typing: T typists send `typing` at --rate signals/s in all for --duration s; every other member
   gets each one: the gateway's CPU above idle per signal and per typing frame delivered.
Raw `websockets` clients (as `connections`); the open-files limit is raised as needed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any
from urllib.parse import quote

import orjson
import psutil
import redis.asyncio as aioredis
import uvloop
from websockets.asyncio.client import ClientConnection, connect

from bench.common import (
    Progress,
    Tokens,
    add_cluster_args,
    maybe_cluster,
    meta,
    parse_watch,
    raise_nofile,
    table,
    write_json,
)
from shared.keys import Keys
from shared.settings import Settings

ROOM = "bench-presence"


def cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


class Member:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.typing = self.events = 0
        self.task = asyncio.create_task(self.read())

    async def read(self) -> None:
        try:
            async for raw in self.ws:
                kind = orjson.loads(raw).get("type")
                if kind == "typing":
                    self.typing += 1
                elif kind == "presence_event":
                    self.events += 1
        except Exception:  # the connection closed: counted as what it got
            return


async def open_member(url: str, token: str, presence: bool) -> Member:
    ws = await connect(f"{url}/ws?v=1&token={quote(token, safe='')}", compression=None, max_queue=64,
                       ping_interval=None, open_timeout=60, close_timeout=1)
    await ws.send(orjson.dumps({"type": "join", "room": ROOM, "presence": presence}).decode())
    while True:
        frame = orjson.loads(await ws.recv())
        if frame.get("type") == "joined":
            return Member(ws)
        if frame.get("type") == "error":
            raise RuntimeError(f"join refused: {frame}")


async def redis_bytes(settings: Settings, users: list[str]) -> int:
    """MEMORY USAGE of the room's presence keys: the two sorted sets and every user's gateways key."""
    keys = Keys(settings.redis_prefix, settings.kafka_partitions)
    r = aioredis.from_url(settings.redis_url)
    try:
        total = 0
        for key in (keys.online(ROOM), keys.online_names(ROOM)):
            total += int(await r.memory_usage(key, samples=0) or 0)
        async with r.pipeline(transaction=False) as pipe:
            for user in users:
                pipe.memory_usage(keys.user_gateways(ROOM, user))
            total += sum(int(x or 0) for x in await pipe.execute())
        return total
    finally:
        await r.aclose()


async def main_async(a: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    url = a.url[0]
    gw_pid = next((pid for name, pid in parse_watch(a.watch).items() if name.startswith("gateway")), None)
    if gw_pid is None:
        raise SystemExit("give --watch gateway=PID (or --cluster)")
    gw = psutil.Process(gw_pid)
    raise_nofile(a.conns + 1000)
    tokens = Tokens(settings, "pres")
    progress = Progress()

    c0 = cpu_s(gw)
    await asyncio.sleep(a.idle)
    base_cpu = (cpu_s(gw) - c0) / a.idle  # cores busy with no client

    members: list[Member] = []
    sem = asyncio.Semaphore(a.concurrency)

    async def one(i: int) -> None:
        async with sem:
            members.append(await open_member(url, tokens.next(), presence=i < a.watchers))

    c0, t0 = cpu_s(gw), time.monotonic()
    tasks = [asyncio.create_task(one(i)) for i in range(a.conns)]
    while not all(t.done() for t in tasks):
        await asyncio.sleep(0.5)
        progress.update(f"[presence] joined {len(members):,}/{a.conns:,}")
    progress.done()
    for t in tasks:
        t.result()
    join_s, join_cpu = time.monotonic() - t0, cpu_s(gw) - c0
    await asyncio.sleep(a.settle)
    watchers = [m for m in members if m.events]
    users = [f"pres-{i}" for i in range(1, a.conns + 1)]
    presence_bytes = await redis_bytes(settings, users)

    c0 = cpu_s(gw)
    await asyncio.sleep(a.idle)
    idle_cpu = (cpu_s(gw) - c0) / a.idle
    refreshes = a.idle / (settings.presence_ttl_s / 4)

    typists = members[a.watchers:a.watchers + a.typists]
    sent = 0
    before = sum(m.typing for m in members)
    c0, t0 = cpu_s(gw), time.monotonic()
    gap = a.typists / a.rate  # each typist types every `gap` seconds (the server forwards one per interval)
    while time.monotonic() - t0 < a.duration:
        for k, m in enumerate(typists):
            due = t0 + (sent // a.typists) * gap + k * gap / a.typists
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            await m.ws.send('{"type":"typing","room":"' + ROOM + '"}')
            sent += 1
            if time.monotonic() - t0 >= a.duration:
                break
        progress.update(f"[presence] typing: {sent} sent")
    typing_s = time.monotonic() - t0
    typing_cpu = cpu_s(gw) - c0
    await asyncio.sleep(2.0)  # the last signals arrive
    delivered = sum(m.typing for m in members) - before
    progress.done()
    for m in members:
        m.task.cancel()
    await asyncio.gather(*(m.ws.close() for m in members), return_exceptions=True)

    above_idle = typing_cpu - idle_cpu * typing_s
    res = {
        "workload": "presence", **meta(), "url": url, "conns": len(members), "watchers": a.watchers,
        "presence_ttl_s": settings.presence_ttl_s, "typing_interval_s": settings.typing_interval_s,
        "baseline_cpu_pct": round(100 * base_cpu, 2),
        "join_s": round(join_s, 2), "cpu_ms_per_join": round(1000 * join_cpu / max(1, len(members)), 3),
        "presence_events_per_watcher": round(sum(m.events for m in watchers) / max(1, len(watchers)), 1),
        "idle_cpu_pct": round(100 * idle_cpu, 2),
        "cpu_us_per_user_s": round(1e6 * max(0.0, idle_cpu - base_cpu) / max(1, len(members)), 2),
        "cpu_us_per_user_refresh": round(1e6 * max(0.0, idle_cpu - base_cpu) * a.idle
                                         / max(1, len(members)) / max(1e-9, refreshes), 2),
        "redis_bytes_per_online_user": round(presence_bytes / max(1, len(members)), 1),
        "typing_sent": sent, "typing_rate": round(sent / typing_s, 1), "typing_frames_delivered": delivered,
        "typing_frames_per_signal": round(delivered / max(1, sent), 1),
        "cpu_ms_per_signal": round(1000 * above_idle / max(1, sent), 3),
        "cpu_us_per_typing_frame": round(1e6 * above_idle / max(1, delivered), 2),
        "typing_cpu_pct": round(100 * typing_cpu / typing_s, 1),
    }
    print(table([res], ["conns", "baseline_cpu_pct", "cpu_ms_per_join", "presence_events_per_watcher", "idle_cpu_pct",
                        "cpu_us_per_user_s", "cpu_us_per_user_refresh", "redis_bytes_per_online_user"]))
    print(table([res], ["typing_sent", "typing_rate", "typing_frames_per_signal", "typing_cpu_pct",
                        "cpu_ms_per_signal", "cpu_us_per_typing_frame"]))
    print(f"load average {res['loadavg']}", file=sys.stderr)
    return res


def add_args(p: argparse.ArgumentParser) -> None:
    add_cluster_args(p)
    p.add_argument("--conns", type=int, default=1000, help="connections, each its own user, in one room")
    p.add_argument("--watchers", type=int, default=10, help="of them, joined with presence events")
    p.add_argument("--typists", type=int, default=50)
    p.add_argument("--rate", type=float, default=5.0, help="typing signals per second, all typists together")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of typing")
    p.add_argument("--idle", type=float, default=15.0, help="seconds of each idle CPU window")
    p.add_argument("--settle", type=float, default=3.0)
    p.add_argument("--concurrency", type=int, default=100, help="connection attempts in flight")


def run(args: argparse.Namespace, settings: Settings) -> int:
    with maybe_cluster(args, settings, gateways=1) as s:
        out = uvloop.run(main_async(args, s))
    write_json(args.out, out)
    return 0 if out["typing_frames_delivered"] > 0 else 1
