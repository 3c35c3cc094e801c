"""roomcast as one more peer of the peer harness, without patching it.

    bench/peers.sh --reps 3 roomcast socketio-redis node-socketio-redis broadcaster-redis rawws

The harness (PEERS_DIR, default ../shared/peers beside the repository) measures every peer with
the same generator and core layout. This module runs the harness's orchestrator with `roomcast`
added: each repetition starts roomcast's whole pipeline with `python -m bench.cluster` from this
repository (Kafka, Redis with AOF, the persister, MySQL database roomcast_bench, two gateways,
all pinned to the server CPUs) in place of a backplane and two nodes, and the generator drives it
through the adapter below (the harness's, minting tokens with the claims roomcast requires).

It runs in the harness's venv (bench/peers.sh sees to it), where `bench` is the harness's package:
so it is imported here by name, never by this repository's `bench`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import importlib
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PEERS_DIR = Path(os.environ.get("PEERS_DIR", REPO.parent / "shared" / "peers")).resolve()
ADAPTER = "peers_roomcast:RoomcastAdapter"


def _harness(module: str) -> Any:
    if str(PEERS_DIR) not in sys.path:
        sys.path.insert(0, str(PEERS_DIR))
    return importlib.import_module(module)


def hs256(claims: dict[str, Any], secret: str) -> str:
    """A JWT (HS256) without a JWT library: the harness's venv has none."""
    def part(obj: dict[str, Any]) -> bytes:
        return base64.urlsafe_b64encode(json.dumps(obj, separators=(",", ":")).encode()).rstrip(b"=")

    signing = part({"alg": "HS256", "typ": "JWT"}) + b"." + part(claims)
    sig = base64.urlsafe_b64encode(hmac.new(secret.encode(), signing, hashlib.sha256).digest()).rstrip(b"=")
    return (signing + b"." + sig).decode()


class RoomcastAdapter(_harness("bench.adapters.roomcast").RoomcastAdapter):  # type: ignore[misc]
    """The harness's roomcast adapter; tokens carry `exp` and `rooms` (roomcast refuses others)."""

    _n = itertools.count(1)

    def _token(self) -> str:
        claims = {"sub": f"bench-{next(self._n)}", "exp": int(time.time()) + 24 * 3600, "rooms": ["*"]}
        return hs256(claims, self.opts["secret"])


def start_cluster(o: Any, a: Any, logs: Path, tag: str) -> tuple[subprocess.Popen[str], list[str], list[str], str]:
    """roomcast's bench cluster in the foreground: (process, gateway urls, NAME=PID to watch, JWT secret)."""
    cmd = [str(REPO / ".venv" / "bin" / "python"), "-m", "bench.cluster", "--server-cpus", a.server_cpus]
    log = open(logs / f"{tag}-cluster.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True)
    o._procs.append(proc)
    assert proc.stdout is not None
    urls = proc.stdout.readline().split()
    names = {"gateway-a": "node-a", "gateway-b": "node-b"}
    watch: list[str] = []
    while line := proc.stdout.readline().strip():
        key, _, value = line.partition("=")
        if key == "JWT_SECRET":
            return proc, urls, watch, value
        watch.append(f"{names.get(key, key)}={value}")
    raise RuntimeError(f"roomcast's cluster did not start; see {logs / (tag + '-cluster.log')}")


def install(o: Any) -> None:
    """Add `roomcast` to the orchestrator's peers; its repetitions start roomcast's cluster."""
    o.PEERS["roomcast"] = o.Peer([], ADAPTER, None, max_start=500,
                                 note="its whole pipeline: Kafka, Redis AOF, persister, MySQL, 2 gateways")
    run_other = o.run_peer_rep

    def run_peer_rep(name: str, peer: Any, rep: int, a: Any, out: Path, logs: Path) -> None:
        if name != "roomcast":
            run_other(name, peer, rep, a, out, logs)
            return
        proc, urls, watch, secret = start_cluster(o, a, logs, f"{name}-rep{rep}")
        # The orchestrator starts a backplane and nodes, then the generator (its one subprocess.run):
        # here the cluster is the pipeline, so nodes are skipped (nodes=0) and the generator's command
        # gets the cluster's gateways, processes to watch and secret appended, for this repetition.
        original_run = o.subprocess.run

        def run_generator(cmd: list[str], **kw: Any) -> Any:
            extra = ["--adapter-opt", f"secret={secret}"]
            extra += [arg for url in urls for arg in ("--url", url)]
            extra += [arg for w in watch for arg in ("--watch", w)]
            return original_run([*cmd, *extra], **kw)

        o.subprocess.run = run_generator
        try:
            run_other(name, o.Peer([], ADAPTER, None, nodes=0, max_start=peer.max_start), rep, a, out, logs)
        finally:
            o.subprocess.run = original_run
            o.stop(proc)

    o.run_peer_rep = run_peer_rep


def main() -> None:
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                             os.environ.get("PYTHONPATH")]))
    os.chdir(PEERS_DIR)
    orchestrate = _harness("bench.orchestrate")
    install(orchestrate)
    orchestrate.main()


if __name__ == "__main__":
    main()
