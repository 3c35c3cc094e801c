"""What one gateway's CPU pays per client send (the send frame in, the per-user limits, the dedupe
claim, the produce, the ack out), and how many Redis commands each send costs.

    .venv/bin/python -m bench.sends                               # throwaway cluster, one gateway
    .venv/bin/python -m bench.sends --users 40 --rate 400 --seconds 15

The cluster runs with the default per-user limits (SEND_RATE_PER_S 50, SEND_BURST 100): --users
connections, one user each, send --rate sends per second in all (each user well under its limit)
for --seconds, and read every ack. The gateway's CPU is measured idle (same connections, nothing
sent) and loaded; the difference divided by the sends is its cost per send. Redis commands per send
come from INFO commandstats (every client of that Redis: the gateway alone, no persister runs).
The server runs on --server-cpus (CPU 0), the clients on --gen-cpus (CPU 1), as in bench.frames.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any
from urllib.parse import quote

import orjson
import redis.asyncio as aioredis
import uvloop
from websockets.asyncio.client import ClientConnection, connect

from bench.cluster import parse_cpus, start_cluster
from bench.common import Tokens, Watch
from shared.mysql import MysqlTarget
from shared.settings import Settings


async def redis_calls(url: str) -> dict[str, int]:
    """Calls per command so far (commands run inside scripts count too)."""
    client = aioredis.from_url(url)
    try:
        stats: dict[str, Any] = await client.info("commandstats")
    finally:
        await client.aclose()
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info"}


async def measure(url: str, redis_url: str, tokens: Tokens, server_pid: int, a: argparse.Namespace) -> dict[str, Any]:
    acks = errors = 0

    async def read(ws: ClientConnection) -> None:
        nonlocal acks, errors
        async for raw in ws:
            kind = orjson.loads(raw)["type"]
            acks += kind == "ack"
            errors += kind == "error"

    conns = [await connect(f"{url}/ws?v=1&token={quote(tokens.next(), safe='')}", compression=None,
                           ping_interval=None, open_timeout=30) for _ in range(a.users)]
    readers = [asyncio.create_task(read(ws)) for ws in conns]
    await asyncio.sleep(3)  # (settle after the handshakes)
    watch = Watch({"server": server_pid})
    watch.start()
    await asyncio.sleep(a.idle)
    idle_pct = watch.cpu_now()["server"]
    body = "x" * 100
    n = int(a.rate * a.seconds)
    calls0 = await redis_calls(redis_url)
    watch.start()
    t0 = time.monotonic()
    for i in range(n):
        frame = {"type": "send", "room": f"r{i % a.rooms}", "client_msg_id": f"m{i}", "body": body}
        await conns[i % len(conns)].send(orjson.dumps(frame).decode())
        ahead = t0 + (i + 1) / a.rate - time.monotonic()
        if ahead > 0:
            await asyncio.sleep(ahead)
    deadline = time.monotonic() + 10
    while acks + errors < n and time.monotonic() < deadline:  # noqa: ASYNC110 (a poll, on purpose)
        await asyncio.sleep(0.02)
    elapsed = time.monotonic() - t0
    loaded_pct = watch.cpu_now()["server"]
    calls1 = await redis_calls(redis_url)
    calls = {k: round((v - calls0.get(k, 0)) / n, 2) for k, v in sorted(calls1.items())
             if v != calls0.get(k, 0)}
    for ws in conns:
        await ws.close()
    for task in readers:
        task.cancel()
    per_send_us = (loaded_pct - idle_pct) / 100 * elapsed / n * 1e6
    return {"sends": n, "acks": acks, "errors": errors, "idle_cpu_pct": round(idle_pct, 2),
            "loaded_cpu_pct": round(loaded_pct, 2), "us_per_send": round(per_send_us, 1),
            "redis_calls_per_send": calls}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=40, help="connections, one user each")
    p.add_argument("--rooms", type=int, default=20)
    p.add_argument("--rate", type=float, default=400, help="sends per second, all users together")
    p.add_argument("--seconds", type=float, default=15)
    p.add_argument("--idle", type=float, default=5, help="seconds of idle measurement first")
    p.add_argument("--server-cpus", type=parse_cpus, default={0})
    p.add_argument("--gen-cpus", type=parse_cpus, default={1})
    p.add_argument("--database", default="roomcast_bench_sends", help="on MYSQL_DSN's server (created, emptied)")
    a = p.parse_args(argv)
    if a.rate / a.users > Settings.model_fields["send_rate_per_s"].default:
        raise SystemExit("each user would send faster than the default limit: add --users or lower --rate")
    limits = {name: Settings.model_fields[name].default for name in ("send_rate_per_s", "send_burst")}
    base = Settings()
    t = MysqlTarget.from_dsn(base.mysql_dsn)
    dsn = f"mysql://{t.user}:{t.password}@{t.host}:{t.port}/{a.database}"
    with start_cluster(base, server_cpus=a.server_cpus, gen_cpus=a.gen_cpus, gateways=1, persister=False,
                       mysql_dsn=dsn, **limits) as cluster:
        out = uvloop.run(measure(cluster.urls[0], cluster.settings.redis_url, Tokens(cluster.settings),
                                 cluster.procs["gateway-a"].pid, a))
    print(f"{out['sends']:,} sends at {a.rate:,.0f}/s from {a.users} users: {out['acks']:,} acked, "
          f"{out['errors']} errors; gateway CPU idle {out['idle_cpu_pct']} %, loaded {out['loaded_cpu_pct']} % -> "
          f"{out['us_per_send']} us per send; Redis calls per send (scripts and the commands they ran): "
          f"{out['redis_calls_per_send']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
