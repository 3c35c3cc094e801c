"""`roomcast simulate`: the options, the run, and where the report goes."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from shared.settings import Settings
from tools.simulate.workload import Workload

HELP = {
    "users": "users sending",
    "msgs_per_user_day": "messages each user sends a day",
    "body_min": "shortest body, bytes",
    "body_max": "longest body, bytes (lengths are uniform in between)",
    "rooms": "rooms over the whole run",
    "zipf": "room popularity exponent (0: all rooms alike)",
    "short_lived": "share of rooms active only for a while (then silent)",
    "life_days": "mean active span of a short-lived room, days",
    "peak_ratio": "busiest hour's rate / the average (daily cosine curve, 1..2)",
    "reads_per_write": "history pages asked for per message sent",
    "read_active": "share of reads in active rooms by popularity (the rest: any room, uniformly)",
    "newest_share": "share of reads of the newest page",
    "deep_share": "share of reads of a page older than the retention (the rest: within it)",
    "days": "simulated days (the retention, 7 days by default, acts only after it has passed)",
    "tick_s": "simulated seconds per step (sends applied, reads made, keys expired)",
    "seed": "random seed (the same seed gives the same traffic)",
}
SETTINGS = ("buffer_cap", "flush_chunk", "redis_retention_s", "sweep_policy", "sweep_interval_s", "sweep_chunk",
            "dedupe_ttl_s", "history_limit_default", "kafka_partitions", "persister_batch_max",
            "persister_backlog_budget")


def add_arguments(p: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(Workload):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                       help=f"{HELP[f.name]} (default %(default)s)")
    p.add_argument("--policies", default="message,list",
                   help="SWEEP_POLICY values to run, in order (default %(default)s)")
    p.add_argument("--sample", type=int, default=200, help="keys of each kind measured with MEMORY USAGE a day "
                                                           "(default %(default)s)")
    p.add_argument("--time-limit", type=float, default=3600.0,
                   help="seconds a policy's run may take before it gives up (default %(default)s)")
    p.add_argument("--fork-window", type=float, default=2.0,
                   help="real seconds the day's second AOF rewrite is stretched to (default %(default)s)")
    p.add_argument("--jobs", type=int, default=2, help="policies run at once, a process each (default %(default)s)")
    p.add_argument("--report", type=Path, help="write PATH.md, PATH/*.png and PATH/results.json (needs roomcast[sim])")
    p.add_argument("--from-results", type=Path, help="skip the run: report from a results.json written before")
    p.add_argument("--quiet", action="store_true", help="no progress line")


def run(args: argparse.Namespace, settings: Settings) -> int:
    logging.basicConfig(level=logging.WARNING)
    if args.from_results:
        results = json.loads(args.from_results.read_text())
    else:
        results = simulate(args, settings)
    from tools.simulate import report

    if args.report is None:
        print(report.render(results, {}))
    else:
        report.write(results, args.report)
        print(f"wrote {args.report}.md and {args.report}/", file=sys.stderr)
    failed = [r["policy"] for r in results["runs"] if not r["consistent"]]
    if failed:
        print(f"INCONSISTENT stores after the {', '.join(failed)} run(s): see the consistency table", file=sys.stderr)
    return 1 if failed else 0


def simulate(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    import uvloop

    from tools.simulate.run import Options, mysql_version, simulate

    workload = Workload(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Workload)})
    policies = tuple(p.strip() for p in args.policies.split(",") if p.strip())
    if not policies or any(p not in ("message", "list") for p in policies):
        raise SystemExit("--policies: a comma-separated list of message and list")
    opts = Options(workload, settings, policies, sample=args.sample, time_limit_s=args.time_limit,
                   progress=not args.quiet, jobs=args.jobs, fork_window_s=args.fork_window)
    started = datetime.datetime.now(datetime.UTC)
    t0, load = time.monotonic(), os.getloadavg()[0]
    runs = simulate(opts)
    return {
        "command": shlex.join(["roomcast", "simulate", *sys.argv[2:]]),
        "started": started.isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - t0, 1),
        "machine": {"mysql": uvloop.run(mysql_version(settings)), "transparent_hugepage": _thp(),
                    "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average": [round(load, 1), round(os.getloadavg()[0], 1)]},  # 1-minute, before and after
        "workload": dataclasses.asdict(workload),
        "settings": {k: getattr(settings, k) for k in SETTINGS},
        "runs": [dataclasses.asdict(r) for r in runs],
    }


def _thp() -> str:
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return thp.read_text().strip() if thp.exists() else "n/a"
