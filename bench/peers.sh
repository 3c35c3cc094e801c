#!/usr/bin/env bash
# The peer harness with roomcast as one more peer (bench/peers_roomcast.py), same generator, same
# core layout (servers on CPU 0, generator on CPU 1):
#   bench/peers.sh --reps 3 roomcast socketio-redis node-socketio-redis broadcaster-redis rawws
#   bench/peers.sh --reps 1 --no-max roomcast            # extra arguments go to the orchestrator
# PEERS_DIR names the harness (default ../shared/peers beside this repository); it is read, never
# changed. Installs what it needs as the harness's run.sh does (its venv, npm packages, redis-server);
# roomcast's own cluster comes from this repository's venv (make the venv first: `make test` or `make run`).
set -euo pipefail
cd "$(dirname "$0")/.."
export PEERS_DIR=${PEERS_DIR:-$(cd .. && pwd)/shared/peers}
VENV=${PEERS_VENV:-/tmp/peers-venv}
test -x .venv/bin/python || { echo "no .venv here: run make test or make run first"; exit 1; }
[ -x "$VENV/bin/python" ] || python3.11 -m venv "$VENV"
"$VENV/bin/python" -c "import socketio, broadcaster, aiokafka, psutil, uvloop, uvicorn" 2>/dev/null \
  || "$VENV/bin/pip" install -q -r "$PEERS_DIR/requirements.txt"
command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; }
[ -d "$PEERS_DIR/servers/node_socketio/node_modules" ] \
  || (cd "$PEERS_DIR/servers/node_socketio" && npm ci --no-audit --no-fund --loglevel=error)
OUT=${PEERS_OUT:-$PWD/bench/results/peers-$(date +%Y%m%d-%H%M%S)}
timeout --signal=TERM 1800 "$VENV/bin/python" bench/peers_roomcast.py --out "$OUT" "$@"
(cd "$PEERS_DIR" && "$VENV/bin/python" -m bench.report "$OUT") | tee "$OUT/summary.md"
