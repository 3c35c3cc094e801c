"""What every workload shares: process watching (CPU%, RSS), percentiles, the progress line,
the results table and JSON output, tokens, and the `--cluster` option."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil

from bench.cluster import WARM_UP_S
from shared.auth import mint_token
from shared.mysql import MysqlTarget
from shared.settings import Settings


def pct_ms(sorted_ns: Sequence[int], q: float) -> float | None:
    """Nearest-rank percentile of nanosecond values, in milliseconds."""
    if not sorted_ns:
        return None
    i = max(0, min(len(sorted_ns) - 1, math.ceil(q * len(sorted_ns)) - 1))
    return round(sorted_ns[i] / 1e6, 2)


def latency_summary(ns: list[int]) -> dict[str, float | None]:
    ns = sorted(ns)
    return {"p50_ms": pct_ms(ns, 0.50), "p95_ms": pct_ms(ns, 0.95), "p99_ms": pct_ms(ns, 0.99),
            "max_ms": pct_ms(ns, 1.0)}


def parse_watch(items: list[str]) -> dict[str, int]:
    out = {}
    for kv in items:
        name, _, pid = kv.partition("=")
        out[name] = int(pid)
    return out


class Watch:
    """CPU% (user+sys over a window; 100 = one core) and peak RSS of named processes, plus this one."""

    def __init__(self, named_pids: dict[str, int]) -> None:
        self.procs = {name: psutil.Process(pid) for name, pid in named_pids.items()}
        self.procs["generator"] = psutil.Process()
        self._t0 = 0.0
        self._cpu0: dict[str, float] = {}
        self._core0: list[Any] = []
        self.rss_peak: dict[str, int] = {}

    @staticmethod
    def _cpu(p: psutil.Process) -> float:
        try:
            t = p.cpu_times()
            return float(t.user + t.system)
        except psutil.Error:
            return float("nan")

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._cpu0 = {n: self._cpu(p) for n, p in self.procs.items()}
        self._core0 = psutil.cpu_times(percpu=True)
        self.rss_peak = {n: 0 for n in self.procs}
        self.sample_rss()

    def sample_rss(self) -> None:
        for n, p in self.procs.items():
            with contextlib.suppress(psutil.Error):
                self.rss_peak[n] = max(self.rss_peak[n], p.memory_info().rss)

    def cpu_now(self) -> dict[str, float]:
        """CPU% of each process since start() (for the progress line)."""
        wall = max(1e-6, time.monotonic() - self._t0)
        return {n: round(100 * (self._cpu(p) - self._cpu0[n]) / wall, 1) for n, p in self.procs.items()}

    def stop(self) -> dict[str, Any]:
        wall = max(1e-6, time.monotonic() - self._t0)
        self.sample_rss()
        procs = {n: {"cpu_pct": round(100 * (self._cpu(p) - self._cpu0[n]) / wall, 1),
                     "rss_mb": round(self.rss_peak[n] / 2**20, 1)} for n, p in self.procs.items()}
        cores = []
        for a, b in zip(self._core0, psutil.cpu_times(percpu=True), strict=False):
            def busy(t: Any) -> float:
                return float(t.user + t.nice + t.system + t.irq + t.softirq + t.steal)
            total = (sum(b) - b.guest - b.guest_nice) - (sum(a) - a.guest - a.guest_nice)
            cores.append(round(100 * (busy(b) - busy(a)) / total, 1) if total > 0 else None)
        ours = sum(v["cpu_pct"] for v in procs.values() if v["cpu_pct"] == v["cpu_pct"])
        return {"procs": procs, "core_busy_pct": cores,
                "unaccounted_cpu_pct": round(sum(c for c in cores if c is not None) - ours, 1)}


class Progress:
    """One live line on stderr (rewritten in place on a terminal, a line per update otherwise)."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self._last = 0.0

    def update(self, text: str, every: float = 1.0) -> None:
        now = time.monotonic()
        if now - self._last < every:
            return
        self._last = now
        if self.tty:
            sys.stderr.write("\r\x1b[K" + text)
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain-text table of the given columns (missing values as '-')."""
    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.2f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def write_json(path: Path | None, record: dict[str, Any]) -> None:
    if path is not None:
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {path}", file=sys.stderr)


def meta() -> dict[str, Any]:
    return {"time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "loadavg": os.getloadavg(),
            "cpus": os.cpu_count(), "generator_cpus": sorted(os.sched_getaffinity(0)), "argv": sys.argv}


def raise_nofile(want: int) -> int:
    """Raise the open-files limit towards `want` (at most the hard limit); returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


class Tokens:
    def __init__(self, settings: Settings, prefix: str = "bench") -> None:
        self.settings = settings
        self.prefix = prefix
        self.n = 0

    def next(self) -> str:
        self.n += 1
        return mint_token(self.settings, f"{self.prefix}-{self.n}", ttl_s=24 * 3600)


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", action="append", default=[], help="a gateway, e.g. ws://127.0.0.1:8001 (repeat)")
    p.add_argument("--watch", action="append", default=[], metavar="NAME=PID",
                   help="a process to report CPU%% and RSS for (repeat)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--cluster", action="store_true",
                   help="start a throwaway cluster (bench/cluster.py) for this run, servers pinned to "
                        "--server-cpus and this generator to --gen-cpus; watches every server process")
    p.add_argument("--server-cpus", default="0")
    p.add_argument("--gen-cpus", default="1")
    p.add_argument("--fetch-wait", type=int, help="with --cluster: KAFKA_FETCH_MAX_WAIT_MS of every consumer")
    p.add_argument("--warm-up", type=float, default=WARM_UP_S,
                   help="with --cluster: seconds of traffic warming the broker's JVM first (bench/cluster.py); 0: cold")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="with --cluster: another setting for the cluster, e.g. kafka_linger_ms=5")


@contextlib.contextmanager
def maybe_cluster(args: argparse.Namespace, settings: Settings, **kw: Any) -> Iterator[Settings]:
    """With --cluster: start one, fill args.url/args.watch, yield its settings; else yield `settings`."""
    if not args.cluster:
        if not args.url:
            raise SystemExit("give --url for each gateway, or --cluster to start a throwaway cluster")
        yield settings
        return
    from bench.cluster import parse_cpus, start_cluster

    updates: dict[str, Any] = dict(kv.split("=", 1) for kv in args.set)
    if args.fetch_wait is not None:
        updates["kafka_fetch_max_wait_ms"] = args.fetch_wait
    for k, v in list(updates.items()):
        field = Settings.model_fields[k]
        if field.annotation in (int, float, bool):
            updates[k] = field.annotation(v) if field.annotation is not bool else v.lower() == "true"
    cluster = start_cluster(settings, server_cpus=parse_cpus(args.server_cpus), gen_cpus=parse_cpus(args.gen_cpus),
                            warm_up_s=args.warm_up, **kw, **updates)
    with cluster:
        args.url = cluster.urls
        mysql_port = MysqlTarget.from_dsn(cluster.settings.mysql_dsn).port
        args.watch = [f"{n}={p}" for n, p in cluster.pids().items()] + shared_mariadb(mysql_port) + args.watch
        args.cluster_obj = cluster
        yield cluster.settings


def shared_mariadb(port: int | None = None) -> list[str]:
    """The machine's mariadbd (the bench database lives there; not ours, not pinned, and other
    databases on it may be busy): watched so the MySQL part of the pipeline shows up at all. With
    several (a test suite's own beside it), the one started with --port=`port`."""
    servers = [proc for proc in psutil.process_iter(["name", "cmdline"]) if proc.info["name"] in ("mariadbd", "mysqld")]
    on_port = [proc for proc in servers if f"--port={port}" in (proc.info["cmdline"] or [])]
    return [f"mariadb-shared={proc.pid}" for proc in (on_port or servers)[:1]]
