"""`roomcast bench WORKLOAD ...`: dispatch to one workload module (each has its own --help)."""

from __future__ import annotations

import argparse
import importlib

from shared.settings import Settings

WORKLOADS = {
    "fanout": "R rooms x S subscribers over two gateways: rates, latency, loss, gateway CPU/RSS (--max)",
    "connections": "C idle joined connections on one gateway: RSS per connection, open time, one-message fan-out",
    "persist": "persister throughput into Redis and MySQL, statements per 100 messages, lag over time",
    "history": "history page latency from Redis vs from MySQL",
    "presence": "C users online in one room on one gateway: CPU per join, per user kept present, per typing signal",
    "rebalance": "a persister joining the group: time to settle, pause, backlog, for 8/32/128 partitions",
}


def main(workload: str, argv: list[str], settings: Settings) -> int:
    module = importlib.import_module(f"bench.{workload}")
    p = argparse.ArgumentParser(prog=f"roomcast bench {workload}", description=module.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_args(p)
    code: int = module.run(p.parse_args(argv), settings)
    return code
