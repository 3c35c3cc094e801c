"""Workload `fanout`: R rooms x S subscribers, one sender per room, 100-byte bodies.

    roomcast bench fanout --cluster --rate 400 --duration 10          # throwaway cluster, one fixed run
    roomcast bench fanout --cluster --max                               # step the rate up until it breaks
    roomcast bench fanout --url ws://127.0.0.1:8001 --url ws://127.0.0.1:8002 --watch gw-a=PID --rate 1000

Every connection is a `roomcast_client.RoomcastClient` (reconnect off: a disconnect is a failure to
report, not to hide). Subscriber i of room r connects to url[(r*S+i) % N], room r's sender to
url[r % N] (the peer harness's layout: every room has half its audience on each of two gateways);
with --placement room, all of room r's clients are on url[r % N] (each gateway delivers only its
rooms but still reads every record: docs/scaling.md).
The body is `run:room:seq:send_ns:` padded to --body-bytes; send_ns is CLOCK_MONOTONIC just before
the send, so latency is send -> deliver as one process sees it. A step is open loop: message k goes
to room k mod R at t0 + k/rate. Lost = expected deliveries that did not arrive within --drain s
after the last send; duplicated = a subscriber got the same (room, seq) twice (the client library
also drops repeats by id and cursor; its count is reported as client_dups_dropped).

With --direct the senders are not clients: the load tool produces each message straight into the
topic, as a gateway would after a send (same value, key and partition; acks=all), so the gateways'
CPU is the fan-out path alone (consume, decode, frame once, deliver) and the send path's share is
the difference from a run without it.

With --max: start at --max-start, x--max-factor while a step holds (p99 <= --p99-limit-ms, nothing
lost or duplicated, no disconnect, sent >= 98 % of the target), then one bisection; reports the
highest rate that held.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import sys
import time
from typing import Any

import uvloop
from aiokafka import AIOKafkaProducer
from roomcast_client import Frame, RoomcastClient

from bench.common import (
    Progress,
    Tokens,
    Watch,
    add_cluster_args,
    latency_summary,
    maybe_cluster,
    meta,
    parse_watch,
    raise_nofile,
    table,
    write_json,
)
from shared.kafka import new_producer
from shared.keys import Keys
from shared.message import Message, new_message_id
from shared.settings import Settings

now_ns = time.monotonic_ns


class Sub:
    __slots__ = ("probed", "room", "seen")

    def __init__(self, room: int) -> None:
        self.room = room
        self.seen: set[int] = set()
        self.probed = False


class Fanout:
    def __init__(self, args: argparse.Namespace, settings: Settings) -> None:
        self.a = args
        self.settings = settings
        self.tokens = Tokens(settings, "fanout")
        self.subs: list[Sub] = []
        self.clients: list[RoomcastClient] = []
        self.senders: list[RoomcastClient] = []
        self.keys = Keys(settings.redis_prefix, settings.kafka_partitions)
        self.producer: AIOKafkaProducer | None = None  # with --direct, instead of the senders
        self.run_id = 0
        self.lat: list[int] = []  # send -> delivery, ns
        self.ack_lat: list[int] = []  # send -> ack, ns: the send path's share of `lat`
        self.dups = self.stale = self.misrouted = 0
        self.acked = self.send_errors = 0
        self.acked_ever = 0  # over every step and the warm-up (acked is per step)
        self.last_rx = now_ns()
        self.pad = "x" * args.body_bytes
        self.watch = Watch(parse_watch(args.watch))
        self.progress = Progress()

    def body(self, run: int, room: int, seq: int) -> str:
        head = f"{run}:{room}:{seq}:{now_ns()}:"
        return head + self.pad[: self.a.body_bytes - len(head)]

    def on_message(self, sub: Sub) -> Any:
        def handle(frame: Frame) -> None:
            t = now_ns()
            self.last_rx = t
            run_s, room_s, seq_s, sent_s, _ = frame["body"].split(":", 4)
            run = int(run_s)
            if run != self.run_id:
                self.stale += 1
                return
            if run == 0:
                sub.probed = True
                return
            if int(room_s) != sub.room:
                self.misrouted += 1
                return
            seq = int(seq_s)
            if seq in sub.seen:
                self.dups += 1
                return
            sub.seen.add(seq)
            self.lat.append(t - int(sent_s))
        return handle

    def _client(self, url: str, on_message: Any = None) -> RoomcastClient:
        c = RoomcastClient(url, self.tokens.next(), reconnect=False, on_message=on_message,
                           request_timeout=30, open_timeout=30, dedupe_window=256)
        self.clients.append(c)
        return c

    async def connect(self) -> dict[str, Any]:
        a, urls = self.a, self.a.url
        sem = asyncio.Semaphore(a.connect_concurrency)

        async def sub(r: int, i: int) -> None:
            s = Sub(r)
            self.subs.append(s)
            async with sem:
                at = r if a.placement == "room" else r * a.subs + i
                c = self._client(urls[at % len(urls)], self.on_message(s))
                await c.start()
                await c.join(f"room-{r}")

        async def pub(r: int) -> RoomcastClient:
            async with sem:
                c = self._client(urls[r % len(urls)])
                await c.start()
                return c

        t0 = time.monotonic()
        await asyncio.gather(*(sub(r, i) for r in range(a.rooms) for i in range(a.subs)))
        if a.direct:
            self.producer = new_producer(self.settings)
            await self.producer.start()
        else:
            self.senders = list(await asyncio.gather(*(pub(r) for r in range(a.rooms))))
        connect_s = time.monotonic() - t0
        t0 = time.monotonic()
        while time.monotonic() - t0 < 60:  # warm-up: until every subscriber got a probe
            cold = {s.room for s in self.subs if not s.probed}
            if not cold:
                break
            for r in cold:
                self.send(r, self.body(0, r, 0))
            await asyncio.sleep(0.3)
        ready = sum(s.probed for s in self.subs) / len(self.subs)
        return {"connect_s": round(connect_s, 2), "warm_s": round(time.monotonic() - t0, 2),
                "subscribers_ready": round(ready, 4)}

    def send(self, room: int, body: str) -> None:
        if self.producer is not None:
            fut: asyncio.Future[Any] = asyncio.ensure_future(self.produce(room, body))
        else:
            fut = self.senders[room].send_nowait(f"room-{room}", body)
        sent_ns = now_ns()
        fut.add_done_callback(lambda f: self._acked(f, sent_ns))

    async def produce(self, room: int, body: str) -> None:
        assert self.producer is not None
        name = f"room-{room}"
        msg_id = new_message_id()
        msg = Message(msg_id, name, "fanout-direct", body, int(time.time() * 1000), msg_id)
        delivery = await self.producer.send(self.settings.kafka_topic, msg.kafka_value(), key=name.encode(),
                                            partition=self.keys.partition(name))
        await delivery

    def _acked(self, fut: asyncio.Future[Frame], sent_ns: int) -> None:
        if fut.cancelled() or fut.exception() is not None:
            self.send_errors += 1
        else:
            self.acked += 1
            self.acked_ever += 1
            self.ack_lat.append(now_ns() - sent_ns)

    def disconnects(self) -> int:
        return sum(1 for c in self.clients if c.error is not None)

    async def settle(self, quiet_s: float = 0.5, limit_s: float = 15.0) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < limit_s and (now_ns() - self.last_rx) / 1e9 < quiet_s:  # noqa: ASYNC110
            await asyncio.sleep(0.1)

    async def step(self, rate: float, duration: float, until: asyncio.Event | None = None) -> dict[str, Any]:
        """Send at `rate` for `duration` s (or until `until` is set), then wait for the deliveries."""
        a, R, S = self.a, self.a.rooms, self.a.subs
        await self.settle()
        self.run_id += 1
        run = self.run_id
        self.lat, self.ack_lat = [], []
        self.dups = self.stale = self.misrouted = self.acked = self.send_errors = 0
        for s in self.subs:
            s.seen = set()
        disc0 = self.disconnects()
        client_dups0 = sum(c.duplicates_dropped for c in self.clients)
        total = max(1, round(rate * duration))
        self.watch.start()
        sent = 0
        t0 = time.monotonic()
        last_rss = t0
        while sent < total:
            now = time.monotonic()
            if now - t0 > duration * 1.25 + 1 or (until is not None and until.is_set()):
                break
            if now - last_rss > 0.5:
                last_rss = now
                self.watch.sample_rss()
                cpu = self.watch.cpu_now()
                self.progress.update(
                    f"[fanout {rate:,.0f}/s] {now - t0:5.1f}s sent {sent:,} delivered {len(self.lat):,}"
                    f" acked {self.acked:,} | " + " ".join(f"{n} {v:.0f}%" for n, v in cpu.items()))
            due = min(total, int((now - t0) * rate) + 1)
            if due <= sent:
                await asyncio.sleep(max(0.001, t0 + sent / rate - now))
                continue
            while sent < due:
                self.send(sent % R, self.body(run, sent % R, sent // R))
                sent += 1
                if sent % 64 == 0:
                    await asyncio.sleep(0)
        stopped_early = until is not None and until.is_set()
        send_s = time.monotonic() - t0 if stopped_early else max(duration, time.monotonic() - t0)
        usage = self.watch.stop()
        expected = sent * S
        t_end = time.monotonic()
        def pending() -> bool:
            return len(self.lat) < expected or self.acked + self.send_errors < sent

        while pending() and time.monotonic() - t_end < a.drain:  # noqa: ASYNC110 (a poll, on purpose)
            await asyncio.sleep(0.02)
        self.progress.done()
        delivered = len(self.lat)
        res: dict[str, Any] = {
            "target_rate": rate, "duration_s": round(send_s, 2), "sent": sent,
            "sent_rate": round(sent / send_s, 1), "acked": self.acked, "send_errors": self.send_errors,
            "expected": expected, "delivered": delivered, "delivered_rate": round(delivered / send_s, 1),
            "lost": expected - delivered, "duplicated": self.dups, "misrouted": self.misrouted,
            "stale": self.stale, "disconnects": self.disconnects() - disc0,
            "client_dups_dropped": sum(c.duplicates_dropped for c in self.clients) - client_dups0,
            "drain_s": round(time.monotonic() - t_end, 2), **latency_summary(self.lat),
            **{f"ack_{k}": v for k, v in latency_summary(self.ack_lat).items()}, **usage,
        }
        gw_cpu = sum(v["cpu_pct"] for n, v in usage["procs"].items() if n.startswith("gateway"))
        if gw_cpu > 0:
            res["deliveries_per_gateway_cpu_s"] = round(delivered / send_s / (gw_cpu / 100))
        res["held"] = bool(res["lost"] == 0 and res["p99_ms"] is not None and res["p99_ms"] <= a.p99_limit_ms
                           and res["sent_rate"] >= 0.98 * rate and res["disconnects"] == 0
                           and res["duplicated"] == 0 and res["send_errors"] == 0)
        self.report_step(res)
        return res

    def report_step(self, r: dict[str, Any]) -> None:
        procs = " ".join(f"{n}={v['cpu_pct']}%/{v['rss_mb']}MB" for n, v in r["procs"].items())
        print(f"rate={r['target_rate']:.0f} sent/s={r['sent_rate']} deliv/s={r['delivered_rate']} "
              f"p50={r['p50_ms']} p95={r['p95_ms']} p99={r['p99_ms']} max={r['max_ms']} "
              f"ack p50={r['ack_p50_ms']} p99={r['ack_p99_ms']} lost={r['lost']} "
              f"dup={r['duplicated']} held={r['held']} | {procs} cores={r['core_busy_pct']}", flush=True)

    async def max_search(self) -> dict[str, Any]:
        a = self.a
        best: float | None = None
        fail: float | None = None
        rate = a.max_start
        steps = []
        while rate <= a.max_cap:
            res = await self.step(rate, a.step_duration)
            steps.append(res)
            if res["held"]:
                best = rate
                if fail is not None:
                    break
                rate = round(rate * a.max_factor)
            else:
                fail = rate
                if best is not None:
                    break
                lower = round(rate / a.max_factor)
                if lower < 10:
                    break
                rate = lower
        if best is not None and fail is not None:
            mid = round(math.sqrt(best * fail))
            if best < mid < fail:
                res = await self.step(mid, a.step_duration)
                steps.append(res)
                if res["held"]:
                    best = mid
                else:
                    fail = mid
        return {"max_rate": best, "first_fail_rate": fail, "steps": steps}

    async def close(self) -> None:
        if self.producer is not None:
            await self.producer.stop()
        await asyncio.gather(*(c.close() for c in self.clients), return_exceptions=True)

    async def start(self) -> dict[str, Any]:
        """Connect every client and warm up (before the first step)."""
        a = self.a
        raise_nofile(a.rooms * (a.subs + 1) + 1000)
        setup = await self.connect()
        print(f"connected {len(self.clients)} clients in {setup['connect_s']}s, warm-up {setup['warm_s']}s, "
              f"subscribers ready {setup['subscribers_ready']:.2%}", file=sys.stderr, flush=True)
        gc.collect()
        gc.freeze()
        return setup

    async def main(self) -> dict[str, Any]:
        a = self.a
        setup = await self.start()
        out: dict[str, Any] = {"workload": "fanout", **meta(), "rooms": a.rooms, "subs": a.subs, "direct": a.direct,
                               "body_bytes": a.body_bytes, "urls": a.url, "setup": setup}
        try:
            if a.max:
                out["max"] = await self.max_search()
                steps = out["max"]["steps"]
            else:
                steps = [await self.step(a.rate, a.duration) for _ in range(a.reps)]
                out["runs"] = steps
        finally:
            await self.close()
        rows = [{**s, "gw_cpu%": "/".join(str(v["cpu_pct"]) for n, v in s["procs"].items() if n.startswith("gateway")),
                 "gw_rss_mb": "/".join(str(v["rss_mb"]) for n, v in s["procs"].items() if n.startswith("gateway")),
                 "deliv/gwcpu_s": s.get("deliveries_per_gateway_cpu_s")} for s in steps]
        print(table(rows, ["target_rate", "sent_rate", "delivered_rate", "p50_ms", "p95_ms", "p99_ms", "max_ms",
                           "lost", "duplicated", "gw_cpu%", "gw_rss_mb", "deliv/gwcpu_s", "held"]))
        if a.max:
            print(f"max rate held: {out['max']['max_rate']} msgs/s (first fail {out['max']['first_fail_rate']})")
        return out


def add_args(p: argparse.ArgumentParser) -> None:
    add_cluster_args(p)
    p.add_argument("--rooms", type=int, default=50)
    p.add_argument("--subs", type=int, default=10, help="subscribers per room")
    p.add_argument("--body-bytes", type=int, default=100)
    p.add_argument("--rate", type=float, default=400, help="aggregate sends/s over all rooms")
    p.add_argument("--duration", type=float, default=10, help="seconds of sending per fixed run")
    p.add_argument("--reps", type=int, default=1, help="fixed runs")
    p.add_argument("--max", action="store_true", help="step the rate up until p99 > limit or any loss")
    p.add_argument("--direct", action="store_true",
                   help="produce the messages straight into the topic (no sender clients): fan-out alone")
    p.add_argument("--max-start", type=float, default=500)
    p.add_argument("--max-factor", type=float, default=1.3)
    p.add_argument("--max-cap", type=float, default=20_000)
    p.add_argument("--step-duration", type=float, default=5)
    p.add_argument("--p99-limit-ms", type=float, default=100)
    p.add_argument("--drain", type=float, default=5)
    p.add_argument("--connect-concurrency", type=int, default=50)
    p.add_argument("--gateways", type=int, default=2, help="with --cluster: gateways to start")
    p.add_argument("--placement", choices=("spread", "room"), default="spread",
                   help="spread: a room's subscribers round-robin over the gateways (the peer layout); "
                        "room: all of room r's subscribers and its sender on gateway r mod N")


def load_args(url: list[str], watch: list[str], **options: Any) -> argparse.Namespace:
    """This workload's options at their defaults, with `options` (e.g. rate=400) and the cluster's
    gateways and processes: for running its load from another workload (history, persist)."""
    p = argparse.ArgumentParser()
    add_args(p)
    args = p.parse_args([])
    args.url, args.watch = url, watch
    for name, value in options.items():
        if not hasattr(args, name):
            raise ValueError(f"fanout has no option {name!r}")
        setattr(args, name, value)
    return args


def run(args: argparse.Namespace, settings: Settings) -> int:
    with maybe_cluster(args, settings, gateways=args.gateways) as s:
        out = uvloop.run(Fanout(args, s).main())
    write_json(args.out, out)
    return 0

