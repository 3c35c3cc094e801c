"""Workload `persist`: the persister's throughput into Redis and MySQL, and its lag over time.

    roomcast bench persist --cluster --messages 200000 --rooms 100
    roomcast bench persist --metrics http://127.0.0.1:9101/metrics --messages 200000   # running cluster

Produces --messages records (100-byte bodies, --rooms rooms, key = room, acks=all) straight into
the topic, as fast as one producer can (or at --rate), the way gateways do; the persister consumes
them. Every 0.5 s the persister's metrics are scraped (`roomcast_persister_applied_total`,
`roomcast_persister_mysql_rows_inserted`, `roomcast_persister_mysql_insert_statements`): lag =
produced - applied since the start. Reported: Redis msgs/s (records applied / time from the first
to the last apply), MySQL rows/s (rows inserted / their time span), MySQL statements per 100
messages moved (insert statements / rows x 100) and per 100 messages applied, and the lag timeline.
With --cluster the cluster has no gateways (only the persister consumes). The rooms' lists start
empty, so MySQL gets (messages per room - buffer cap) rows per room.

With --catch-up (issue 21: catch-up after an outage while live traffic keeps its p99; --cluster
only, two gateways): the fanout workload (bench/fanout.py, 50 rooms x 10 subscribers) runs at
--live-rate for --baseline s with the persister up (the baseline window); then the persister is
stopped (SIGTERM), --backlog records are produced into the topic with no live traffic, and a fresh
persister is started while the fanout workload runs again at --live-rate. Catch-up time: from the
persister's start until its applied count reaches the backlog plus every live message acked since
it stopped, as that was one sample (0.2 s) earlier (it trails the live head by the pipeline's
latency, so "every message acked so far" is never reached while messages keep coming); the live
load stops sending then. Reported: catch-up time, time to its first apply,
the live latency during the catch-up vs the baseline window, lost and duplicated deliveries, and
whether the persister applied exactly what was produced.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

import uvloop
from aiokafka import AIOKafkaProducer

from bench import fanout
from bench.cluster import Cluster
from bench.common import Progress, Watch, add_cluster_args, maybe_cluster, meta, parse_watch, table, write_json
from shared.keys import Keys
from shared.message import Message, new_message_id
from shared.settings import Settings
from tools.services import scrape

APPLIED = "roomcast_persister_applied_total"
ROWS = "roomcast_persister_mysql_rows_inserted"
STATEMENTS = "roomcast_persister_mysql_insert_statements"


async def produce(settings: Settings, messages: int, room_count: int, rate: float, counter: list[int]) -> float:
    keys = Keys(settings.redis_prefix, settings.kafka_partitions)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=5,
                                max_batch_size=256 * 1024, enable_idempotence=False)
    await producer.start()
    rooms = [f"persist-{i}" for i in range(room_count)]
    parts = [keys.partition(r) for r in rooms]
    body = "x" * 100
    t0 = time.monotonic()
    try:
        pending: list[asyncio.Future[Any]] = []
        for i in range(messages):
            r = i % room_count
            msg = Message(new_message_id(), rooms[r], f"user-{r}", body, int(time.time() * 1000), f"c{i}")
            pending.append(await producer.send(settings.kafka_topic, msg.kafka_value(), key=rooms[r].encode(),
                                               partition=parts[r]))
            if len(pending) >= 2000:
                await asyncio.gather(*pending)
                counter[0] += len(pending)
                pending = []
                if rate:
                    ahead = counter[0] / rate - (time.monotonic() - t0)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
        await asyncio.gather(*pending)
        counter[0] += len(pending)
    finally:
        await producer.stop()
    return time.monotonic() - t0


async def main_async(a: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    url = a.metrics
    base = scrape(url)
    watch = Watch(parse_watch(a.watch))
    progress = Progress()
    produced = [0]
    samples: list[dict[str, float]] = []
    watch.start()
    t0 = time.monotonic()
    prod_task = asyncio.create_task(produce(settings, a.messages, a.rooms, a.rate, produced))
    first_apply = last_apply = None
    last_applied = 0.0
    rows_t: list[tuple[float, float]] = []
    while True:
        await asyncio.sleep(0.5)
        m = scrape(url)
        t = time.monotonic() - t0
        applied = m.get(APPLIED, 0) - base.get(APPLIED, 0)
        rows = m.get(ROWS, 0) - base.get(ROWS, 0)
        stmts = m.get(STATEMENTS, 0) - base.get(STATEMENTS, 0)
        if applied > 0 and first_apply is None:
            first_apply = t
        if applied > last_applied:
            last_apply, last_applied = t, applied
        rows_t.append((t, rows))
        samples.append({"t": round(t, 2), "produced": produced[0], "applied": applied, "lag": produced[0] - applied,
                        "rows": rows, "statements": stmts})
        watch.sample_rss()
        cpu = watch.cpu_now()
        progress.update(f"[persist] {t:5.1f}s produced {produced[0]:,} applied {applied:,.0f} lag "
                        f"{produced[0] - applied:,.0f} mysql rows {rows:,.0f} stmts {stmts:,.0f} | "
                        + " ".join(f"{n} {v:.0f}%" for n, v in cpu.items()), every=0.9)
        if prod_task.done() and applied >= produced[0] and rows_t[-1][1] == (rows_t[-3][1] if len(rows_t) > 3 else -1):
            break
        if t > a.timeout:
            print("timeout: the persister did not catch up", file=sys.stderr)
            break
    progress.done()
    produce_s = prod_task.result() if prod_task.done() else None
    usage = watch.stop()
    applied = samples[-1]["applied"]
    rows = samples[-1]["rows"]
    stmts = samples[-1]["statements"]
    span = (last_apply - first_apply) if first_apply is not None and last_apply is not None else 0
    # MySQL: from the first sample with rows to the first sample with the final count
    r_first = next((t for t, r in rows_t if r > 0), None)
    r_last = next((t for t, r in rows_t if r >= rows), None)
    res = {
        "workload": "persist", **meta(), "messages": a.messages, "rooms": a.rooms,
        "produced": produced[0], "produce_s": round(produce_s, 2) if produce_s else None,
        "produce_rate": round(produced[0] / produce_s) if produce_s else None,
        "applied": applied, "redis_msgs_per_s": round(applied / span) if span else None,
        "mysql_rows": rows,
        "mysql_rows_per_s": round(rows / (r_last - r_first)) if r_first and r_last and r_last > r_first else None,
        "mysql_statements": stmts,
        "statements_per_100_rows": round(100 * stmts / rows, 2) if rows else None,
        "statements_per_100_applied": round(100 * stmts / applied, 2) if applied else None,
        "max_lag": max(s["lag"] for s in samples), "lag_timeline": samples, **usage,
    }
    print(table([res], ["produced", "produce_rate", "applied", "redis_msgs_per_s", "mysql_rows", "mysql_rows_per_s",
                        "mysql_statements", "statements_per_100_rows", "max_lag"]))
    print("cpu: " + " ".join(f"{n}={v['cpu_pct']}%" for n, v in usage["procs"].items()))
    return res


async def applied(url: str) -> float:
    return (await asyncio.to_thread(scrape, url)).get(APPLIED, 0.0)


async def catch_up(a: argparse.Namespace, settings: Settings, cluster: Cluster) -> dict[str, Any]:
    live = fanout.Fanout(fanout.load_args(a.url, a.watch, rate=a.live_rate), settings)
    await live.start()
    progress = Progress()
    try:
        baseline = await live.step(a.live_rate, a.baseline)
        old_url = cluster.persister_metrics
        t0 = time.monotonic()
        while await applied(old_url) < live.acked_ever and time.monotonic() - t0 < 30:  # noqa: ASYNC110
            await asyncio.sleep(0.2)  # (the new persister then has the backlog and what comes after)
        # the outage
        await asyncio.to_thread(cluster.procs["persister"].stop)
        del live.watch.procs["persister"]
        acked_at_stop = live.acked_ever
        backlog = [0]
        produce_s = await produce(settings, a.backlog, a.rooms, 0, backlog)
        print(f"persister stopped; produced a backlog of {backlog[0]:,} records in {produce_s:.1f}s",
              file=sys.stderr, flush=True)

        def target() -> int:
            return backlog[0] + live.acked_ever - acked_at_stop

        caught_up = asyncio.Event()
        await live.settle()
        live_step = asyncio.create_task(live.step(a.live_rate, a.timeout, caught_up))
        t_start = time.monotonic()
        proc = await asyncio.to_thread(cluster.start_persister)
        watch = Watch({"persister": proc.pid})
        watch.start()
        url = cluster.persister_metrics
        first_apply_s = catch_up_s = None
        timeline = []
        was = target()
        while catch_up_s is None:
            await asyncio.sleep(0.2)
            t, done = time.monotonic() - t_start, await applied(url)
            if done > 0 and first_apply_s is None:
                first_apply_s = t
            timeline.append({"t": round(t, 2), "applied": done, "target": target()})
            progress.update(f"[catch-up] {t:5.1f}s applied {done:,.0f} of {target():,}", every=0.9)
            if done >= was:
                catch_up_s = t
            elif t > a.timeout:
                print("timeout: the persister did not catch up", file=sys.stderr)
                break
            was = target()
        caught_up.set()
        during = await live_step
        usage = watch.stop()
        await asyncio.sleep(1)  # (the last live messages applied)
        applied_final, target_final = await applied(url), target()
        mysql_rows = (await asyncio.to_thread(scrape, url)).get(ROWS, 0)
    finally:
        await live.close()
    progress.done()
    res: dict[str, Any] = {
        "workload": "persist-catch-up", **meta(), "backlog": backlog[0], "rooms": a.rooms,
        "backlog_produce_s": round(produce_s, 2), "live_rate": a.live_rate,
        "catch_up_s": round(catch_up_s, 2) if catch_up_s is not None else None,
        "first_apply_s": round(first_apply_s, 2) if first_apply_s is not None else None,
        "applied": applied_final, "produced_since_stop": target_final,
        "applied_minus_produced": applied_final - target_final, "mysql_rows": mysql_rows,
        "persister_cpu_pct": usage["procs"]["persister"]["cpu_pct"],
        "baseline": baseline, "during": during, "timeline": timeline,
    }
    rows = [{"window": name, "live_rate": step["target_rate"], "sent": step["sent"],
             "delivered": step["delivered"], "lost": step["lost"], "duplicated": step["duplicated"],
             "p50_ms": step["p50_ms"], "p95_ms": step["p95_ms"], "p99_ms": step["p99_ms"], "max_ms": step["max_ms"]}
            for name, step in (("baseline", baseline), ("catch-up", during))]
    print(table(rows, ["window", "live_rate", "sent", "delivered", "lost", "duplicated", "p50_ms", "p95_ms",
                       "p99_ms", "max_ms"]))
    print(table([res], ["backlog", "live_rate", "catch_up_s", "first_apply_s", "applied", "produced_since_stop",
                        "applied_minus_produced", "mysql_rows", "persister_cpu_pct"]))
    return res


def add_args(p: argparse.ArgumentParser) -> None:
    add_cluster_args(p)
    p.add_argument("--metrics", help="the persister's /metrics URL (with --cluster: found)")
    p.add_argument("--messages", type=int, default=200_000)
    p.add_argument("--rooms", type=int, default=100)
    p.add_argument("--rate", type=float, default=0, help="produce at this rate (0: as fast as possible)")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--catch-up", action="store_true",
                   help="with --cluster: the persister stopped, a backlog, then its catch-up under live traffic")
    p.add_argument("--backlog", type=int, default=240_000, help="with --catch-up: records produced while it is down")
    p.add_argument("--live-rate", type=float, default=400, help="with --catch-up: the fanout workload's msgs/s")
    p.add_argument("--baseline", type=float, default=10, help="with --catch-up: seconds of live traffic before")


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.catch_up:
        if not args.cluster:
            raise SystemExit("--catch-up stops and restarts the persister: it needs --cluster")
        with maybe_cluster(args, settings, gateways=2) as s:
            out = uvloop.run(catch_up(args, s, args.cluster_obj))
        write_json(args.out, out)
        return 0
    if not args.cluster and not args.url:
        args.url = ["-"]  # no gateway is needed
    with maybe_cluster(args, settings, gateways=0) as s:
        if args.cluster:
            args.metrics = args.cluster_obj.persister_metrics
        if not args.metrics:
            raise SystemExit("give --metrics (the persister's METRICS_PORT) or --cluster")
        out = uvloop.run(main_async(args, s))
    write_json(args.out, out)
    return 0

