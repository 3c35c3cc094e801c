"""The load tool keeps working: one small run of a workload against a throwaway cluster.

No figure is asserted (speed is measured by the benchmarks, not by tests); only that the tool runs
end to end and reports complete pages from both stores. The broker's warm-up is cut to 1 s here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture
def bench_env(mysql_server_dsn: str) -> dict[str, str]:
    """The throwaway cluster starts its own Kafka and Redis; MySQL is the test session's."""
    return {**os.environ, "MYSQL_DSN": f"{mysql_server_dsn}/roomcast_bench"}


@pytest.mark.timeout(180)
def test_bench_history_runs_against_a_throwaway_cluster(tmp_path: Path, bench_env: dict[str, str]) -> None:
    out = tmp_path / "history.json"
    subprocess.run([sys.executable, "-m", "shared.cli", "bench", "history", "--cluster", "--requests", "20",
                    "--seed", "250", "--warm-up", "1", "--out", str(out)],
                   check=True, capture_output=True, timeout=170, env=bench_env)
    result = json.loads(out.read_text())
    assert result["workload"] == "history" and result["requests"] == 20
    for source in ("redis", "mysql"):
        assert result[source]["page_sizes"] == [50], "every page was full"
        assert result[source]["p50_ms"] > 0


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", [[], ["--direct"]], ids=["sent-by-clients", "produced-directly"])
def test_bench_fanout_delivers_every_message_to_every_subscriber(tmp_path: Path, mode: list[str],
                                                                   bench_env: dict[str, str]) -> None:
    out = tmp_path / "fanout.json"
    subprocess.run([sys.executable, "-m", "shared.cli", "bench", "fanout", "--cluster", "--rooms", "3", "--subs", "2",
                    "--rate", "30", "--duration", "2", "--warm-up", "1", *mode, "--out", str(out)],
                   check=True, capture_output=True, timeout=170, env=bench_env)
    (run,) = json.loads(out.read_text())["runs"]
    assert run["sent"] == 60 and run["acked"] == 60 and run["ack_p50_ms"] > 0
    assert run["expected"] == 120 and run["delivered"] == 120 and run["lost"] == 0 and run["duplicated"] == 0
