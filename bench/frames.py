"""What a server's CPU pays for one WebSocket frame in and one out: `ping` frames, each answered.

    .venv/bin/python -m bench.frames                         # roomcast's gateway (throwaway cluster)
    .venv/bin/python -m bench.frames --alone                 # ... with the rest of the cluster off its core
    .venv/bin/python -m bench.frames --server starlette      # a bare uvicorn + Starlette echo endpoint
    .venv/bin/python -m bench.frames --server websockets     # a bare `websockets` echo server

The server runs on --server-cpus (CPU 0), the clients on --gen-cpus (CPU 1): --conns connections
send --rate `{"type":"ping"}` frames per second in all for --seconds and read every answer. The
server's CPU is measured idle (same connections, nothing sent) and loaded; the difference divided by
the frames is its cost per frame in and frame out. Every client send of roomcast costs a gateway
one such pair (the `send` and its `ack`) besides the dedupe claim and the produce.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from typing import Any
from urllib.parse import quote

import psutil
import uvloop
from websockets.asyncio.client import ClientConnection, connect

from bench.cluster import parse_cpus, start_cluster
from bench.common import Tokens, Watch
from shared.settings import Settings
from tools import localstack
from tools.localstack import LOCALHOST

PING = '{"type":"ping"}'
PONG = '{"type":"pong"}'


def serve(kind: str, port: int) -> None:
    """A bare echo server answering every text frame with a pong (the comparison's floor)."""
    if kind == "starlette":
        import uvicorn
        from starlette.applications import Starlette
        from starlette.routing import WebSocketRoute
        from starlette.websockets import WebSocket

        async def endpoint(websocket: WebSocket) -> None:
            await websocket.accept()
            while (await websocket.receive())["type"] != "websocket.disconnect":
                await websocket.send_text(PONG)

        app = Starlette(routes=[WebSocketRoute("/ws", endpoint)])
        uvicorn.run(app, host=LOCALHOST, port=port, ws="websockets-sansio", loop="uvloop", log_level="error")
    else:
        from websockets.asyncio.server import ServerConnection
        from websockets.asyncio.server import serve as ws_serve
        from websockets.exceptions import ConnectionClosed

        async def handler(ws: ServerConnection) -> None:
            try:
                async for _ in ws:
                    await ws.send(PONG)
            except ConnectionClosed:
                pass

        async def main() -> None:
            async with ws_serve(handler, LOCALHOST, port, compression=None):
                await asyncio.Future()

        uvloop.run(main())


async def measure(urls: list[str], tokens: Tokens | None, server_pid: int, a: argparse.Namespace) -> dict[str, Any]:
    answers = 0

    async def open_one(i: int) -> ClientConnection:
        token = quote(tokens.next(), safe="") if tokens is not None else "-"
        return await connect(f"{urls[i % len(urls)]}/ws?v=1&token={token}", compression=None, ping_interval=None,
                             open_timeout=30)

    async def read(ws: ClientConnection) -> None:
        nonlocal answers
        async for _ in ws:
            answers += 1

    conns = [await open_one(i) for i in range(a.conns)]
    readers = [asyncio.create_task(read(ws)) for ws in conns]
    await asyncio.sleep(3)  # (settle after the handshakes)
    watch = Watch({"server": server_pid})
    watch.start()
    await asyncio.sleep(a.idle)
    idle_pct = watch.cpu_now()["server"]
    n = int(a.rate * a.seconds)
    watch.start()
    t0 = time.monotonic()
    for i in range(n):
        await conns[i % len(conns)].send(PING)
        ahead = t0 + (i + 1) / a.rate - time.monotonic()
        if ahead > 0:
            await asyncio.sleep(ahead)
    deadline = time.monotonic() + 10
    while answers < n and time.monotonic() < deadline:  # noqa: ASYNC110 (a poll, on purpose)
        await asyncio.sleep(0.02)
    elapsed = time.monotonic() - t0
    loaded_pct = watch.cpu_now()["server"]
    for ws in conns:
        await ws.close()
    for task in readers:
        task.cancel()
    per_frame_us = (loaded_pct - idle_pct) / 100 * elapsed / n * 1e6
    return {"frames": n, "answered": answers, "idle_cpu_pct": round(idle_pct, 2),
            "loaded_cpu_pct": round(loaded_pct, 2), "us_per_frame": round(per_frame_us, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", choices=("gateway", "starlette", "websockets"), default="gateway")
    p.add_argument("--alone", action="store_true", help="gateway: move Kafka, Redis and the persister to --gen-cpus")
    p.add_argument("--conns", type=int, default=50)
    p.add_argument("--rate", type=float, default=800, help="ping frames per second, all connections together")
    p.add_argument("--seconds", type=float, default=15)
    p.add_argument("--idle", type=float, default=5, help="seconds of idle measurement first")
    p.add_argument("--server-cpus", type=parse_cpus, default={0})
    p.add_argument("--gen-cpus", type=parse_cpus, default={1})
    p.add_argument("--serve", nargs=2, metavar=("KIND", "PORT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.serve:
        serve(a.serve[0], int(a.serve[1]))
        return 0
    if a.server == "gateway":
        with start_cluster(Settings(), server_cpus=a.server_cpus, gen_cpus=a.gen_cpus, gateways=1) as cluster:
            if a.alone:
                for name, proc in cluster.procs.items():
                    if not name.startswith("gateway"):
                        for thread in psutil.Process(proc.pid).threads():
                            os.sched_setaffinity(thread.id, a.gen_cpus)
            out = uvloop.run(measure(cluster.urls, Tokens(cluster.settings), cluster.procs["gateway-a"].pid, a))
    else:
        port = localstack.free_port()
        own = os.sched_getaffinity(0)
        os.sched_setaffinity(0, a.server_cpus)
        child = subprocess.Popen([sys.executable, "-m", "bench.frames", "--serve", a.server, str(port)])
        os.sched_setaffinity(0, a.gen_cpus or own)
        try:
            localstack.wait_port(LOCALHOST, port, 15)
            out = uvloop.run(measure([f"ws://{LOCALHOST}:{port}"], None, child.pid, a))
        finally:
            child.terminate()
            child.wait(10)
    print(f"{a.server}{' (alone on its core)' if a.alone else ''}: {out['frames']:,} pings at {a.rate:,.0f}/s over "
          f"{a.conns} connections, {out['answered']:,} answered; server CPU idle {out['idle_cpu_pct']} %, loaded "
          f"{out['loaded_cpu_pct']} % -> {out['us_per_frame']} us per frame in + frame out")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
