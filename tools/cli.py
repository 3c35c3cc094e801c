"""The developer's and operator's `roomcast` commands beyond the kernel's (shared/cli.py): up, down,
gateway add, check, stats, post, bench, simulate. Registered through the `roomcast.commands` entry point group
(pyproject)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
from pathlib import Path

from shared.settings import Settings


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from tools.localkafka import local_ports
    from tools.localstack import LOCALHOST
    from tools.up import Up, UpOptions

    updates: dict[str, object] = {}
    if args.kafka_port is not None or args.kafka_nodes > 1:
        first = args.kafka_port or int(settings.kafka_bootstrap.split(",")[0].rpartition(":")[2])
        updates["kafka_bootstrap"] = ",".join(f"{LOCALHOST}:{p}" for p, _ in local_ports(args.kafka_nodes, first))
    if args.kafka_nodes > 1:
        updates["kafka_replication"] = min(3, args.kafka_nodes)
    if args.redis_port is not None:
        updates["redis_url"] = f"redis://{LOCALHOST}:{args.redis_port}/0"
    if args.mysql_port is not None:
        updates["mysql_dsn"] = _with_mysql_port(settings.mysql_dsn, args.mysql_port)
    settings = settings.model_copy(update=updates)
    gateway_ports = args.gateway_ports
    if args.gateways is not None:
        gateway_ports = list(range(gateway_ports[0], gateway_ports[0] + args.gateways))
    opts = UpOptions(
        data_dir=args.data_dir.resolve(),
        gateway_ports=tuple(gateway_ports),
        lb_port=args.lb_port,
        persister_metrics_port=args.persister_metrics_port,
        sweeper_metrics_port=args.sweeper_metrics_port,
        kafka_nodes=args.kafka_nodes,
        own_redis=args.redis_port is not None or "redis_url" not in settings.model_fields_set,
        redis_maxmemory=args.redis_maxmemory,
        install=not args.no_install,
    )
    return Up(settings, opts).run()


def cmd_down(args: argparse.Namespace, settings: Settings) -> int:
    from tools.up import down

    return down(args.data_dir.resolve())


def cmd_gateway_add(args: argparse.Namespace, settings: Settings) -> int:
    from tools.up import request_gateway

    return request_gateway(args.data_dir.resolve())


def cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    from tools import ops

    _quiet_client_logs()
    findings = asyncio.run(ops.check_all(settings, args.timeout))
    if args.json:
        print(json.dumps([{**dataclasses.asdict(f), "failed": f.failed} for f in findings], indent=2))
    else:
        print(ops.format_findings(findings))
    return 1 if any(f.failed for f in findings) else 0


def cmd_stats(args: argparse.Namespace, settings: Settings) -> int:
    from tools import ops

    _quiet_client_logs()
    stats = asyncio.run(ops.gather_stats(settings, args.timeout))
    print(json.dumps(stats.as_dict(), indent=2) if args.json else ops.format_stats(stats))
    return 1 if stats.errors else 0


def cmd_post(args: argparse.Namespace, settings: Settings) -> int:
    """POST the text to the room through a gateway's publish API; prints the ack (exit 0), or the
    error answer on stderr (exit 1)."""
    import sys
    import urllib.error
    import urllib.parse
    import urllib.request
    import uuid

    from shared.auth import mint_token

    base = args.url or f"http://127.0.0.1:{settings.port}"
    token = args.token or mint_token(settings, args.user)
    body = json.dumps({"client_msg_id": args.client_msg_id or uuid.uuid4().hex, "body": args.text}).encode()
    url = f"{base.rstrip('/')}/rooms/{urllib.parse.quote(args.room, safe='')}/messages"
    req = urllib.request.Request(url, data=body, method="POST", headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=args.timeout) as answer:
            print(answer.read().decode())
            return 0
    except urllib.error.HTTPError as e:
        print(f"{e.code} {e.read().decode()}", file=sys.stderr)
    except OSError as e:
        print(f"no answer from {base}: {e}", file=sys.stderr)
    return 1


def cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    from bench.cli import main as bench_main

    return bench_main(args.workload, args.args, settings)


def cmd_simulate(args: argparse.Namespace, settings: Settings) -> int:
    from tools.simulate.cli import run

    return run(args, settings)


def _quiet_client_logs() -> None:
    """aiokafka logs every failed connection attempt; the checks report them once, as a verdict."""
    logging.basicConfig(level=logging.CRITICAL)
    for name in ("aiokafka", "kafka"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _ports(text: str) -> list[int]:
    """argparse type: '8001,8002' -> [8001, 8002]."""
    try:
        ports = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated port numbers, got {text!r}") from None
    if not ports or not all(0 < p < 65536 for p in ports) or len(set(ports)) != len(ports):
        raise argparse.ArgumentTypeError(f"expected distinct port numbers, got {text!r}")
    return ports


def _with_mysql_port(dsn: str, port: int) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(dsn)
    auth = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=(f"{auth}@" if auth else "") + f"127.0.0.1:{port}"))


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from tools import up

    data_dir = up.default_data_dir()
    p = sub.add_parser(
        "up", help="run the whole cluster on this machine in the foreground (what `make run` does)",
        description="Reuse the Kafka broker, Redis (REDIS_URL) and MySQL that already answer, start the ones "
                    "missing (Apache Kafka, redis-server with AOF, MariaDB) in the data folder, migrate, "
                    "start two gateways, the persister and the sweeper, HAProxy in front of the gateways, "
                    "print where to connect, and stay until Ctrl-C / SIGTERM; then stop everything it started, "
                    "in order.")
    p.add_argument("--data-dir", type=Path, default=data_dir, help=f"data, logs and pidfiles (default {data_dir})")
    p.add_argument("--lb-port", type=int, default=up.LB_PORT,
                   help="HAProxy, the one address clients need: chat page, REST and /ws (default %(default)s)")
    p.add_argument("--gateway-ports", type=_ports, default=",".join(map(str, up.GATEWAY_PORTS)),
                   help="comma-separated, one gateway per port (default %(default)s)")
    p.add_argument("--gateways", type=int, choices=range(1, 33), metavar="N",
                   help="N gateways on consecutive ports from the first of --gateway-ports")
    p.add_argument("--kafka-port", type=int,
                   help="first broker on 127.0.0.1:PORT, its controller on PORT+1, the next node on PORT+2 ... "
                        "(default: KAFKA_BOOTSTRAP)")
    p.add_argument("--kafka-nodes", type=int, choices=(1, 3), default=1,
                   help="Kafka nodes to start: 3 gives replication factor 3 and min.insync.replicas 2 "
                        "(default %(default)s)")
    p.add_argument("--redis-port", type=int,
                   help="run our own Redis on 127.0.0.1:PORT even if REDIS_URL is set (default: REDIS_URL, "
                        "else our own on the port of the default REDIS_URL, 6380)")
    p.add_argument("--mysql-port", type=int, help="MySQL on 127.0.0.1:PORT (default: from MYSQL_DSN)")
    p.add_argument("--persister-metrics-port", type=int, default=up.PERSISTER_METRICS_PORT,
                   help="(default %(default)s)")
    p.add_argument("--sweeper-metrics-port", type=int, default=up.SWEEPER_METRICS_PORT, help="(default %(default)s)")
    p.add_argument("--redis-maxmemory", default=up.REDIS_MAXMEMORY,
                   help="memory budget of our own Redis (default %(default)s)")
    p.add_argument("--no-install", action="store_true",
                   help="never run apt-get for a missing redis-server / mariadbd; print the command instead")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("down", help="stop what `roomcast up` started, from another shell (what `make stop` does)")
    p.add_argument("--data-dir", type=Path, default=data_dir, help="the data folder of that `up` (default %(default)s)")
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("gateway", help="change the gateways of a running `roomcast up`")
    actions = p.add_subparsers(dest="action", required=True)
    p = actions.add_parser("add", help="one more gateway, put into HAProxy's rotation; nothing else restarts",
                           description="Asks the running `roomcast up` (SIGUSR1) to start a gateway on the next free "
                                       "port and register it with HAProxy through its runtime API; returns once "
                                       "HAProxy's health checks pass on it.")
    p.add_argument("--data-dir", type=Path, default=data_dir, help="the data folder of that `up` (default %(default)s)")
    p.set_defaults(func=cmd_gateway_add)

    p = sub.add_parser("check", help="say whether the configured Kafka, Redis and MySQL answer and are set up right",
                       description="One line per dependency: ok, WARN, MISCONFIGURED or UNREACHABLE with the reason. "
                                   "Exit code 1 if any is MISCONFIGURED or UNREACHABLE.")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds per dependency (default %(default)s)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("stats", help="rooms, buffered and archived messages, persister lag per partition",
                       description="Walks the rooms table by id in chunks and counts each room's Redis list "
                                   "(pipelined LLEN, never KEYS); a progress bar shows on a terminal. Lag is the "
                                   "Kafka high-water mark minus the persister's applied mark.")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds per request (default %(default)s)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("post", help="post a message to a room through a gateway's publish API",
                       description="POST /rooms/ROOM/messages with a token for --user minted with the configured "
                                   "secret (or --token). Prints the ack; a retry with the same --client-msg-id is "
                                   "acknowledged again and not posted twice.")
    p.add_argument("room")
    p.add_argument("text")
    p.add_argument("--url", default=None, help="the gateway (default http://127.0.0.1:PORT, PORT the setting)")
    p.add_argument("--user", default="roomcast-cli", help="the sender, for the minted token (default %(default)s)")
    p.add_argument("--token", default=None, help="a token to use instead of minting one")
    p.add_argument("--client-msg-id", default=None, help="the send's id (default a random one)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds (default %(default)s)")
    p.set_defaults(func=cmd_post)

    from bench.cli import WORKLOADS

    p = sub.add_parser("bench", help=f"the load tool: {' | '.join(WORKLOADS)} (see bench/README.md)",
                       description="Runs one workload against a running cluster (--url ...) or a throwaway one "
                                   "(--cluster). `roomcast bench WORKLOAD --help` lists its options.")
    p.add_argument("workload", choices=tuple(WORKLOADS))
    p.add_argument("args", nargs=argparse.REMAINDER, help="the workload's options")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("simulate", help="days of traffic through the real persister, sweeper and history reader "
                                        "(docs/capacity.md)",
                       description="Simulated days of chat traffic against the real persister, chunk mover, sweeper "
                                   "and history reader, on a Redis of its own (AOF on, a free port) and a database of "
                                   "its own on the MYSQL_DSN server (dropped afterwards), with a simulated clock; once "
                                   "per SWEEP_POLICY. Other settings (BUFFER_CAP, FLUSH_CHUNK, REDIS_RETENTION_S, ...) "
                                   "come from the environment. Prints the report, or writes it with --report.")
    from tools.simulate.cli import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_simulate)
