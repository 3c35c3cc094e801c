"""Workload `connections`: C idle, authenticated connections joined to one room, on ONE gateway.

    roomcast bench connections --cluster --conns 10000
    roomcast bench connections --url ws://127.0.0.1:8001 --watch gateway=PID --conns 10000

Reports the gateway's RSS before and after (RSS per connection = growth / C, measured after a
settle pause and a second sample), the time to open and join them all, then sends ONE message to
the room from another connection and reports the fan-out time: until the first and the last of the
C connections received it (and how many did). The connections are raw `websockets` clients (one
Python process can hold 10,000+ of them; the full client library costs more memory and tasks per
connection than this test needs); the open-files limit is raised to the hard limit if needed.
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
from shared.settings import Settings

ROOM = "bench-idle"


async def open_one(url: str, token: str) -> ClientConnection:
    ws = await connect(f"{url}/ws?v=1&token={quote(token, safe='')}", compression=None, max_queue=4,
                       ping_interval=None, open_timeout=60, close_timeout=1)
    await ws.send(orjson.dumps({"type": "join", "room": ROOM}).decode())
    while True:
        frame = orjson.loads(await ws.recv())
        if frame.get("type") == "joined":
            return ws
        if frame.get("type") == "error":
            raise RuntimeError(f"join refused: {frame}")


def rss(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return None


async def main_async(a: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    url = a.url[0]
    watch = parse_watch(a.watch)
    gw_pid = next((pid for name, pid in watch.items() if name.startswith("gateway")), None)
    limit = raise_nofile(a.conns + 1000)
    if limit < a.conns + 100:
        print(f"warning: open-files limit {limit} is below {a.conns} connections", file=sys.stderr)
    tokens = Tokens(settings, "idle")
    progress = Progress()
    await asyncio.sleep(1.0)
    rss0 = rss(gw_pid)
    conns: list[ClientConnection] = []
    sem = asyncio.Semaphore(a.concurrency)
    failed = 0

    async def one() -> None:
        nonlocal failed
        async with sem:
            try:
                conns.append(await open_one(url, tokens.next()))
            except Exception as e:  # reported as a count; the first few are printed
                failed += 1
                if failed <= 3:
                    print(f"connect failed: {e!r}", file=sys.stderr)

    t0 = time.monotonic()
    tasks = [asyncio.create_task(one()) for _ in range(a.conns)]
    while not all(t.done() for t in tasks):
        await asyncio.sleep(0.2)
        progress.update(f"[connections] {time.monotonic() - t0:5.1f}s open {len(conns):,}/{a.conns:,} failed {failed}"
                        + (f" gateway RSS {(rss(gw_pid) or 0) / 2**20:.0f} MB" if gw_pid else ""))
    open_s = time.monotonic() - t0
    progress.done()
    await asyncio.sleep(a.settle)
    rss1 = rss(gw_pid)
    await asyncio.sleep(1.0)
    rss1 = max(rss1 or 0, rss(gw_pid) or 0) or None

    # one message to all
    got: list[float] = []
    t_send = 0.0

    async def wait_message(ws: ClientConnection) -> None:
        try:
            while True:
                frame = orjson.loads(await ws.recv())
                if frame.get("type") == "message":
                    got.append(time.monotonic() - t_send)
                    return
        except Exception:
            return

    waiters = [asyncio.create_task(wait_message(ws)) for ws in conns]
    sender = await connect(f"{url}/ws?v=1&token={quote(tokens.next(), safe='')}", compression=None,
                           ping_interval=None)
    await asyncio.sleep(0.5)
    t_send = time.monotonic()
    await sender.send(orjson.dumps({"type": "send", "room": ROOM, "client_msg_id": "one", "body": "x" * 100}).decode())
    deadline = time.monotonic() + a.fanout_timeout
    while len(got) < len(conns) and time.monotonic() < deadline:  # noqa: ASYNC110 (a poll, on purpose)
        await asyncio.sleep(0.01)
    for w in waiters:
        w.cancel()
    await sender.close()
    t_close = time.monotonic()
    await asyncio.gather(*(ws.close() for ws in conns), return_exceptions=True)
    close_s = time.monotonic() - t_close
    got.sort()
    per_conn = (rss1 - rss0) / max(1, len(conns)) if rss0 and rss1 else None
    res = {
        "workload": "connections", **meta(), "url": url, "requested": a.conns, "open": len(conns), "failed": failed,
        "open_s": round(open_s, 2), "opens_per_s": round(len(conns) / open_s, 1) if open_s else None,
        "gateway_rss_before_mb": round(rss0 / 2**20, 1) if rss0 else None,
        "gateway_rss_after_mb": round(rss1 / 2**20, 1) if rss1 else None,
        "rss_per_conn_kb": round(per_conn / 1024, 2) if per_conn is not None else None,
        "fanout_received": len(got), "fanout_first_ms": round(got[0] * 1000, 1) if got else None,
        "fanout_p50_ms": round(got[len(got) // 2] * 1000, 1) if got else None,
        "fanout_all_ms": round(got[-1] * 1000, 1) if got and len(got) == len(conns) else None,
        "fanout_last_ms": round(got[-1] * 1000, 1) if got else None, "close_s": round(close_s, 2),
    }
    print(table([res], ["open", "failed", "open_s", "opens_per_s", "gateway_rss_before_mb", "gateway_rss_after_mb",
                        "rss_per_conn_kb", "fanout_received", "fanout_first_ms", "fanout_p50_ms", "fanout_last_ms"]))
    return res


def add_args(p: argparse.ArgumentParser) -> None:
    add_cluster_args(p)
    p.add_argument("--conns", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=200, help="connection attempts in flight")
    p.add_argument("--settle", type=float, default=3.0, help="seconds to wait before the RSS sample")
    p.add_argument("--fanout-timeout", type=float, default=30.0)


def run(args: argparse.Namespace, settings: Settings) -> int:
    with maybe_cluster(args, settings, gateways=1) as s:
        if args.cluster:  # only the one gateway is measured
            args.watch = [w for w in args.watch if w.startswith("gateway")]
        out = uvloop.run(main_async(args, s))
    write_json(args.out, out)
    return 0 if out["failed"] == 0 and out["fanout_received"] == out["open"] else 1

